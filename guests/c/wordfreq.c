/*
 * wordfreq: a C guest for ferry, built with Debian's clang against wasi-libc (reactor model).
 *
 * It writes a deterministic pseudo-English text, one chunk per quantum, tokenises it, counts word
 * frequencies in a chained hash table (malloc'd nodes, strdup'd words, a bucket array that doubles),
 * and when every word is counted sorts the table with qsort and prints the most frequent words with
 * printf (stdout -> fd_write -> ferry's console). Then run() returns HALTED.
 *
 * Configuration (config_read, `key=value ...`):
 *   words=<n>   words to generate and count (default 1000000)
 *   vocab=<n>   vocabulary size (default 5000)
 *   seed=<n>    PRNG seed (default 1; 0 is treated as 1)
 *   top=<n>     how many words to print (default 10)
 *
 * Text: xorshift32 PRNG; word rank = (r1 % vocab) * (r2 % vocab) / vocab (skewed towards low
 * ranks); the word for rank k spells k's base-16 digits with the syllables below; one word in
 * sixteen is Capitalised, one ALL CAPS, one ends with ',' and one with '.'. Counting lower-cases
 * and strips punctuation. One budget unit = one word. progress() = words counted.
 *
 * Output:
 *   wordfreq: <words> words, <distinct> distinct
 *   <rank>. <word> <count>          (count descending, then word ascending)
 *   wordfreq: done
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("ferry"), import_name("config_read")))
int32_t ferry_config_read(char *ptr, int32_t cap);

enum { RUNNING = 0, IDLE = 1, HALTED = 2 };

static const char *const SYL[16] = {"ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo",
                                     "ba", "de", "fi", "go", "hu", "ja", "ke", "li"};

struct node {
  char *word;
  uint32_t count;
  struct node *next;
};

static struct node **buckets;
static size_t nbuckets, distinct;
static uint64_t target = 1000000, done_words, vocab = 5000, top = 10;
static uint32_t rng = 1;
static char *text;
static size_t text_cap;
static int halted;

static uint32_t next(void) {
  rng ^= rng << 13;
  rng ^= rng >> 17;
  rng ^= rng << 5;
  return rng;
}

static uint64_t cfg_u64(const char *cfg, const char *key, uint64_t dflt) {
  size_t klen = strlen(key);
  for (const char *p = cfg; *p;) {
    while (*p == ' ' || *p == '\t' || *p == '\n') p++;
    if (strncmp(p, key, klen) == 0 && p[klen] == '=') dflt = strtoull(p + klen + 1, NULL, 10);
    while (*p && *p != ' ' && *p != '\t' && *p != '\n') p++;
  }
  return dflt;
}

static void fatal(const char *what) {
  fprintf(stderr, "wordfreq: %s\n", what);
  abort();
}

__attribute__((constructor)) static void setup(void) {
  int32_t n = ferry_config_read(NULL, 0);
  char *cfg = calloc((size_t)(n > 0 ? n : 0) + 1, 1);
  if (!cfg) fatal("out of memory");
  if (n > 0) ferry_config_read(cfg, n);
  target = cfg_u64(cfg, "words", target);
  vocab = cfg_u64(cfg, "vocab", vocab);
  top = cfg_u64(cfg, "top", top);
  rng = (uint32_t)cfg_u64(cfg, "seed", 1);
  if (rng == 0) rng = 1;
  if (vocab == 0 || vocab > 0xFFFF) fatal("vocab must be between 1 and 65535");
  free(cfg);
  nbuckets = 64;
  buckets = calloc(nbuckets, sizeof *buckets);
  if (!buckets) fatal("out of memory");
}

static uint32_t hash(const char *s) {
  uint32_t h = 2166136261u;
  while (*s) h = (h ^ (unsigned char)*s++) * 16777619u;
  return h;
}

static void grow(void) {
  size_t nb = nbuckets * 2;
  struct node **b = calloc(nb, sizeof *b);
  if (!b) fatal("out of memory");
  for (size_t i = 0; i < nbuckets; i++) {
    for (struct node *n = buckets[i], *nx; n; n = nx) {
      nx = n->next;
      size_t j = hash(n->word) & (nb - 1);
      n->next = b[j];
      b[j] = n;
    }
  }
  free(buckets);
  buckets = b;
  nbuckets = nb;
}

static void count_word(const char *w) {
  size_t i = hash(w) & (nbuckets - 1);
  for (struct node *n = buckets[i]; n; n = n->next) {
    if (strcmp(n->word, w) == 0) {
      n->count++;
      return;
    }
  }
  struct node *n = malloc(sizeof *n);
  if (!n || !(n->word = strdup(w))) fatal("out of memory");
  n->count = 1;
  n->next = buckets[i];
  buckets[i] = n;
  if (++distinct > nbuckets) grow();
}

/* Appends one decorated word to the text at `len`; returns the new length. */
static size_t gen_word(size_t len) {
  uint64_t a = next() % vocab; /* two statements: C leaves operand order unspecified */
  uint64_t b = next() % vocab;
  uint64_t k = a * b / vocab;
  char w[64];
  size_t wl = 0;
  do {
    memcpy(w + wl, SYL[k & 15], 2);
    wl += 2;
    k >>= 4;
  } while (k);
  w[wl] = 0;
  switch (next() & 15) {
    case 0: w[0] = (char)toupper((unsigned char)w[0]); break;
    case 1: for (size_t i = 0; i < wl; i++) w[i] = (char)toupper((unsigned char)w[i]); break;
    case 2: strcat(w, ","); break;
    case 3: strcat(w, "."); break;
    default: break;
  }
  int n = snprintf(text + len, text_cap - len, "%s ", w);
  return len + (size_t)n;
}

static int by_count(const void *a, const void *b) {
  const struct node *x = *(const struct node *const *)a, *y = *(const struct node *const *)b;
  if (x->count != y->count) return x->count < y->count ? 1 : -1;
  return strcmp(x->word, y->word);
}

static void report(void) {
  struct node **all = malloc((distinct ? distinct : 1) * sizeof *all);
  if (!all) fatal("out of memory");
  size_t k = 0;
  for (size_t i = 0; i < nbuckets; i++)
    for (struct node *n = buckets[i]; n; n = n->next) all[k++] = n;
  qsort(all, k, sizeof *all, by_count);
  printf("wordfreq: %llu words, %zu distinct\n", (unsigned long long)done_words, distinct);
  for (size_t i = 0; i < k && i < top; i++) printf("%zu. %s %u\n", i + 1, all[i]->word, all[i]->count);
  printf("wordfreq: done\n");
  fflush(stdout);
  free(all);
}

__attribute__((export_name("run"))) int32_t run(int32_t budget) {
  if (halted) return HALTED;
  uint64_t n = budget > 0 ? (uint64_t)budget : 1;
  if (n > target - done_words) n = target - done_words;
  if (n > 1u << 20) n = 1u << 20;
  /* 1. write a chunk of text: at most 2*8 syllable letters + punctuation + space per word */
  size_t need = (size_t)n * 24 + 1;
  if (need > text_cap) {
    char *t = realloc(text, need);
    if (!t) fatal("out of memory");
    text = t;
    text_cap = need;
  }
  size_t len = 0;
  for (uint64_t i = 0; i < n; i++) len = gen_word(len);
  /* 2. tokenise and count */
  char *save = NULL;
  for (char *tok = strtok_r(text, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
    char *o = tok;
    for (char *p = tok; *p; p++)
      if (isalpha((unsigned char)*p)) *o++ = (char)tolower((unsigned char)*p);
    *o = 0;
    if (*tok) count_word(tok);
    done_words++;
  }
  if (done_words >= target) {
    report();
    halted = 1;
    return HALTED;
  }
  return RUNNING;
}

__attribute__((export_name("progress"))) int64_t progress(void) { return (int64_t)done_words; }
