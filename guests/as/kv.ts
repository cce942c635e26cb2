// kv: a key-value service on ferry's network device (see docs/guest-abi.md, "The network device").
//
// Protocol, per connection, one request per line (`\n`, an optional `\r` before it is ignored):
//   SET <key> <value>   → OK            key: 1–250 bytes, no whitespace or control bytes;
//   GET <key>           → VALUE <value>    value: the rest of the line after one space, 0–4000
//                         or NOTFOUND      bytes, may contain spaces
//   DEL <key>           → DELETED or NOTFOUND
//   COUNT               → COUNT <n>
//   anything else       → ERR <reason>   (a line longer than SET + a maximal key and value is
//                                         answered with "ERR line too long" once its end arrives)
// Requests may be split across DATA records and pipelined; each connection has its own line
// buffer; replies go out in request order, coalesced into one DATA record per connection and
// run of requests. When a connection state cannot be allocated the guest closes the connection
// (a guest → host CLOSE record).
//
// Configuration: `ring=<bytes>` each ring's size (power of two, 4 KiB–16 MiB, default 1 MiB);
// `keys=<n>` expected number of keys, to size the hash table up front (default 0: grow as needed).
//
// Backpressure: the rx record being processed is only consumed (rx head advanced) once all its
// requests are answered; before each request the guest checks that tx has room for a worst-case
// reply, and if not it stops mid-record (the position is kept in a global, so it migrates) and
// returns RUNNING so the host drains tx. One budget unit = one request (or OPEN/CLOSE record).
//
// Memory: an open-addressing hash table (linear probing, 32-bit hash + entry pointer per slot,
// doubling at load 1/2, deletion by backward shift so there are no tombstones) over entries kept
// in an arena with size-class free lists (16-byte classes), so DEL+SET churn reuses memory. Old
// hash tables are handed to the arena as chunks when the table grows. A 9-byte key with a 32-byte
// value costs 48 bytes + 16 bytes of table: a million such keys take ~64 MiB.
// progress() = requests answered.
import { cfgSize, configLoad, fatal, outStr, outU64, outByte, outFlush, sbrk } from "./common";

@external("ferry", "net_init")
declare function net_init(base: usize, ringSize: u32): i32;

const RUNNING = 0;
const IDLE = 1;

const OPEN: u32 = 1;
const DATA: u32 = 2;
const CLOSE: u32 = 3;
const REC_HDR: u32 = 12;
const MAX_PAYLOAD: u32 = 65536;

const MAX_KEY: u32 = 250;
const MAX_VALUE: u32 = 4000;
const LINE_MAX: u32 = 4 + MAX_KEY + 1 + MAX_VALUE + 1; // "SET k v" plus a '\r'
const MAX_REPLY: u32 = 6 + MAX_VALUE + 1; // "VALUE <v>\n"
const CONN_HDR: usize = 16; // conn u32, len u32, discarding u32, pad
const CONN_SIZE: usize = CONN_HDR + <usize>LINE_MAX;
const ENTRY_HDR: usize = 4; // klen u8, pad u8, vlen u16
const CLASS_SHIFT: usize = 4;
const MAX_ALLOC: usize = 4352;
const CLASSES: usize = (MAX_ALLOC >> CLASS_SHIFT) + 1;
const CHUNK: usize = 1 << 20;

// --- state (all in memory or globals, so it migrates) ---
let ringSize: u32 = 0;
let ringMask: u32 = 0;
let rxH: usize = 0, rxD: usize = 0, txH: usize = 0, txD: usize = 0;
let served: u64 = 0;
let count: u32 = 0;

// current rx DATA record being processed
let recActive = false;
let recLen: u32 = 0;
let recOff: u32 = 0;
let recConn: usize = 0; // conn state
// open tx DATA record
let txOpen = false;
let txStart: u32 = 0;
let txLen: u32 = 0;
let txConn: u32 = 0;

// ---------------------------------------------------------------------------------------------
// Arena: size classes of 16 bytes, free lists threaded through the blocks.

const freeHeads = memory.data(<i32>(CLASSES * 4));
let chunkCur: usize = 0;
let chunkEnd: usize = 0;
let spare: usize = 0; // stack of donated chunks: [next u32, size u32]

@inline function classOf(size: usize): usize { return (size + 15) >> CLASS_SHIFT; }

function arenaFreeRange(p: usize, n: usize): void {
  // cut a free range into the largest classes that fit
  while (n >= 16) {
    let c = min<usize>(n >> CLASS_SHIFT, CLASSES - 1);
    store<u32>(p, load<u32>(freeHeads + (c << 2)));
    store<u32>(freeHeads + (c << 2), <u32>p);
    p += c << CLASS_SHIFT;
    n -= c << CLASS_SHIFT;
  }
}

function alloc(size: usize): usize {
  let c = classOf(size);
  let head = load<u32>(freeHeads + (c << 2));
  if (head != 0) {
    store<u32>(freeHeads + (c << 2), load<u32>(<usize>head));
    return <usize>head;
  }
  let need = c << CLASS_SHIFT;
  if (chunkCur + need > chunkEnd) {
    arenaFreeRange(chunkCur, chunkEnd - chunkCur);
    if (spare != 0) {
      let s = spare;
      spare = <usize>load<u32>(s);
      chunkCur = s;
      chunkEnd = s + <usize>load<u32>(s + 4);
    } else {
      let p = sbrk(CHUNK);
      if (p == 0) return 0;
      chunkCur = p;
      chunkEnd = p + CHUNK;
    }
    if (chunkCur + need > chunkEnd) return alloc(size);
  }
  let p = chunkCur;
  chunkCur += need;
  return p;
}

function release(p: usize, size: usize): void {
  let c = classOf(size);
  store<u32>(p, load<u32>(freeHeads + (c << 2)));
  store<u32>(freeHeads + (c << 2), <u32>p);
}

function donate(p: usize, size: usize): void {
  if (size < MAX_ALLOC) { arenaFreeRange(p, size); return; }
  store<u32>(p, <u32>spare);
  store<u32>(p + 4, <u32>size);
  spare = p;
}

// ---------------------------------------------------------------------------------------------
// Hash tables (keys and connections): linear probing over u64 slots, low 32 bits = hash (keys)
// or connection id (connections), high 32 bits = pointer (0 = empty). Deletion shifts the rest of
// the cluster back (no tombstones), so churn never forces a rebuild; tables only double.

let tab: usize = 0;
let cap: u32 = 0;

function hashBytes(p: usize, n: u32): u32 {
  let h: u32 = 2166136261;
  for (let i: u32 = 0; i < n; i++) h = (h ^ <u32>load<u8>(p + i)) * 16777619;
  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16;
  return h;
}

@inline function connHash(id: u32): u32 { let h = id * 0x9E3779B1; return h ^ (h >> 15); }

/** Home slot of slot value `s` in a table; `conns` selects the connection table's hash. */
@inline function home(s: u64, conns: bool): u32 { return conns ? connHash(<u32>s) : <u32>s; }

/** Empties slot `i` of table `t` (mask `m`), shifting later members of its cluster back. */
function slotDelete(t: usize, m: u32, i: u32, conns: bool): void {
  let j = i;
  while (true) {
    j = (j + 1) & m;
    let s = load<u64>(t + (<usize>j << 3));
    if (s == 0) break;
    let k = home(s, conns) & m;
    let stays = j > i ? (k > i && k <= j) : (k > i || k <= j);
    if (!stays) {
      store<u64>(t + (<usize>i << 3), s);
      i = j;
    }
  }
  store<u64>(t + (<usize>i << 3), 0);
}

function tableAlloc(c: u32): usize {
  let t = sbrk(<usize>c << 3, 16);
  if (t != 0) memory.fill(t, 0, <usize>c << 3);
  return t;
}

/** Doubles table `t` of capacity `c`; returns the new table (0 if out of memory). Donates the old one to the arena. */
function tableGrow(t: usize, c: u32, conns: bool): usize {
  let nc = c << 1;
  let nt = tableAlloc(nc);
  if (nt == 0) return 0;
  let m = nc - 1;
  for (let i: u32 = 0; i < c; i++) {
    let s = load<u64>(t + (<usize>i << 3));
    if (s == 0) continue;
    let j = home(s, conns) & m;
    while (load<u64>(nt + (<usize>j << 3)) != 0) j = (j + 1) & m;
    store<u64>(nt + (<usize>j << 3), s);
  }
  donate(t, <usize>c << 3);
  return nt;
}

@inline function entrySize(e: usize): usize {
  return ENTRY_HDR + <usize>load<u8>(e) + <usize>load<u16>(e + 2);
}

function sameKey(e: usize, k: usize, kl: u32): bool {
  if (<u32>load<u8>(e) != kl) return false;
  let ek = e + ENTRY_HDR;
  for (let i: u32 = 0; i < kl; i++) if (load<u8>(ek + i) != load<u8>(k + i)) return false;
  return true;
}

let foundSlot: u32 = 0; // slot of the match, or the empty slot ending the probe
/** Returns the entry for key [k, k+kl) with hash h, or 0 (then foundSlot is where to insert). */
function lookup(k: usize, kl: u32, h: u32): usize {
  let m = cap - 1;
  let i = h & m;
  while (true) {
    let s = load<u64>(tab + (<usize>i << 3));
    let e = <usize>(s >> 32);
    if (e == 0) { foundSlot = i; return 0; }
    if (<u32>s == h && sameKey(e, k, kl)) { foundSlot = i; return e; }
    i = (i + 1) & m;
  }
  return 0;
}

/** Makes room for one more key; false when the table is full and cannot grow. */
function ensureRoom(): bool {
  if ((count + 1) << 1 <= cap) return true;
  let nt = cap < 0x40000000 ? tableGrow(tab, cap, false) : 0;
  if (nt == 0) return count + 1 < cap;
  tab = nt;
  cap <<= 1;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Connections: id → state (conn u32, line length u32, discarding u32, pad, line buffer).

let ctab: usize = 0;
let ccap: u32 = 0;
let ccount: u32 = 0;

function connFind(id: u32): u32 {
  let m = ccap - 1;
  let i = connHash(id) & m;
  while (true) {
    let s = load<u64>(ctab + (<usize>i << 3));
    if (s == 0) return 0xFFFFFFFF;
    if (<u32>s == id) return i;
    i = (i + 1) & m;
  }
  return 0xFFFFFFFF;
}

/** The state of connection `id`, created (empty line buffer) if absent; 0 if out of memory. */
function connGet(id: u32, reset: bool): usize {
  let i = connFind(id);
  if (i != 0xFFFFFFFF) {
    let st = <usize>(load<u64>(ctab + (<usize>i << 3)) >> 32);
    if (reset) { store<u32>(st + 4, 0); store<u32>(st + 8, 0); }
    return st;
  }
  if ((ccount + 1) << 1 > ccap) {
    let nt = tableGrow(ctab, ccap, true);
    if (nt != 0) { ctab = nt; ccap <<= 1; }
    else if (ccount + 1 >= ccap) return 0;
  }
  let st = alloc(CONN_SIZE);
  if (st == 0) return 0;
  store<u32>(st, id); store<u32>(st + 4, 0); store<u32>(st + 8, 0);
  let m = ccap - 1;
  let j = connHash(id) & m;
  while (load<u64>(ctab + (<usize>j << 3)) != 0) j = (j + 1) & m;
  store<u64>(ctab + (<usize>j << 3), (<u64>st << 32) | <u64>id);
  ccount++;
  return st;
}

function connDrop(id: u32): void {
  let i = connFind(id);
  if (i == 0xFFFFFFFF) return;
  let st = <usize>(load<u64>(ctab + (<usize>i << 3)) >> 32);
  slotDelete(ctab, ccap - 1, i, true);
  ccount--;
  release(st, CONN_SIZE);
}

// ---------------------------------------------------------------------------------------------
// Rings.

@inline function rxHead(): u32 { return load<u32>(rxH); }
@inline function rxTail(): u32 { return load<u32>(rxH + 4); }
@inline function txHead(): u32 { return load<u32>(txH); }
@inline function txTail(): u32 { return load<u32>(txH + 4); }
@inline function rxWord(pos: u32): u32 { return load<u32>(rxD + <usize>(pos & ringMask)); }
@inline function pad4(n: u32): u32 { return (n + 3) & ~3; }

let txPos: u32 = 0; // where the next payload byte of the open record goes

function txByte(c: u32): void {
  store<u8>(txD + <usize>(txPos & ringMask), <u8>c);
  txPos++;
  txLen++;
}

function txBytes(src: usize, n: u32): void {
  let off = txPos & ringMask;
  let first = min<u32>(n, ringSize - off);
  memory.copy(txD + <usize>off, src, first);
  if (first < n) memory.copy(txD, src + first, n - first);
  txPos += n;
  txLen += n;
}

function txStr(s: string): void {
  for (let i = 0; i < s.length; i++) txByte(<u32>s.charCodeAt(i));
}

function txNum(n: u64): void {
  let k: u32 = 0;
  do { store<u8>(digits + k++, <u8>(48 + n % 10)); n /= 10; } while (n != 0);
  while (k > 0) txByte(<u32>load<u8>(digits + --k));
}
const digits = memory.data(24);

/** Publishes the open tx record (header, then tail). */
function txClose(): void {
  if (!txOpen) return;
  store<u32>(txD + <usize>(txStart & ringMask), txLen);
  store<u32>(txD + <usize>((txStart + 4) & ringMask), txConn);
  store<u32>(txD + <usize>((txStart + 8) & ringMask), DATA);
  store<u32>(txH + 4, txStart + REC_HDR + pad4(txLen));
  txOpen = false;
}

/** Sends a one-record control message (CLOSE) to `conn`, if there is room. */
function txControl(conn: u32, type: u32): bool {
  txClose();
  let t = txTail();
  if (ringSize - (t - txHead()) < REC_HDR) return false;
  store<u32>(txD + <usize>(t & ringMask), 0);
  store<u32>(txD + <usize>((t + 4) & ringMask), conn);
  store<u32>(txD + <usize>((t + 8) & ringMask), type);
  store<u32>(txH + 4, t + REC_HDR);
  return true;
}

/** Opens (or continues) a tx record for `conn` with room for a worst-case reply; false if tx is too full. */
function txReserve(conn: u32): bool {
  if (txOpen && (txConn != conn || txLen + MAX_REPLY > MAX_PAYLOAD)) txClose();
  let used = txOpen ? (txPos - txHead()) : (txTail() - txHead() + REC_HDR);
  if (used + MAX_REPLY + 3 > ringSize) return false;
  if (!txOpen) {
    txOpen = true;
    txStart = txTail();
    txPos = txStart + REC_HDR;
    txLen = 0;
    txConn = conn;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Requests.

@inline function isCtl(c: u32): bool { return c <= 32 || c == 127; }

function startsWith(p: usize, n: u32, s: string): bool {
  let l = <u32>s.length;
  if (n < l) return false;
  for (let i: u32 = 0; i < l; i++) if (<u32>load<u8>(p + i) != <u32>s.charCodeAt(i)) return false;
  return true;
}

/** Checks a key at [k, k+kl): 1–250 bytes, no whitespace/control bytes. Sends ERR and returns false otherwise. */
function keyOk(k: usize, kl: u32): bool {
  if (kl == 0) { txStr("ERR missing key\n"); return false; }
  if (kl > MAX_KEY) { txStr("ERR key too long\n"); return false; }
  for (let i: u32 = 0; i < kl; i++) if (isCtl(<u32>load<u8>(k + i))) { txStr("ERR bad key\n"); return false; }
  return true;
}

function handle(p: usize, n: u32): void {
  if (n > 0 && load<u8>(p + n - 1) == 13) n--;
  if (startsWith(p, n, "GET ") || startsWith(p, n, "DEL ")) {
    let isGet = load<u8>(p) == 71;
    let k = p + 4, kl = n - 4;
    if (!keyOk(k, kl)) return;
    let h = hashBytes(k, kl);
    let e = lookup(k, kl, h);
    if (e == 0) { txStr("NOTFOUND\n"); return; }
    if (isGet) {
      txStr("VALUE ");
      txBytes(e + ENTRY_HDR + <usize>load<u8>(e), <u32>load<u16>(e + 2));
      txByte(10);
    } else {
      slotDelete(tab, cap - 1, foundSlot, false);
      count--;
      release(e, entrySize(e));
      txStr("DELETED\n");
    }
    return;
  }
  if (startsWith(p, n, "SET ")) {
    let k = p + 4;
    let kl: u32 = 0;
    while (<u32>4 + kl < n && load<u8>(k + kl) != 32) kl++;
    if (<u32>4 + kl >= n) { txStr("ERR usage: SET <key> <value>\n"); return; }
    if (!keyOk(k, kl)) return;
    let v = k + kl + 1;
    let vl = n - 5 - kl;
    if (vl > MAX_VALUE) { txStr("ERR value too long\n"); return; }
    let h = hashBytes(k, kl);
    let e = lookup(k, kl, h);
    let size = ENTRY_HDR + <usize>kl + <usize>vl;
    if (e != 0) {
      if (classOf(entrySize(e)) == classOf(size)) {
        store<u16>(e + 2, <u16>vl);
        memory.copy(e + ENTRY_HDR + kl, v, vl);
        txStr("OK\n");
        return;
      }
      let ne = alloc(size);
      if (ne == 0) { txStr("ERR out of memory\n"); return; }
      store<u8>(ne, <u8>kl); store<u8>(ne + 1, 0); store<u16>(ne + 2, <u16>vl);
      memory.copy(ne + ENTRY_HDR, k, kl);
      memory.copy(ne + ENTRY_HDR + kl, v, vl);
      store<u64>(tab + (<usize>foundSlot << 3), (<u64>ne << 32) | <u64>h);
      release(e, entrySize(e));
      txStr("OK\n");
      return;
    }
    if (!ensureRoom()) { txStr("ERR out of memory\n"); return; }
    let ne = alloc(size);
    if (ne == 0) { txStr("ERR out of memory\n"); return; }
    store<u8>(ne, <u8>kl); store<u8>(ne + 1, 0); store<u16>(ne + 2, <u16>vl);
    memory.copy(ne + ENTRY_HDR, k, kl);
    memory.copy(ne + ENTRY_HDR + kl, v, vl);
    lookup(k, kl, h); // the table may have been rebuilt: find the insertion slot again
    store<u64>(tab + (<usize>foundSlot << 3), (<u64>ne << 32) | <u64>h);
    count++;
    txStr("OK\n");
    return;
  }
  if (n == 5 && startsWith(p, n, "COUNT")) { txStr("COUNT "); txNum(count); txByte(10); return; }
  if (n == 0) { txStr("ERR empty request\n"); return; }
  let w: u32 = 0;
  while (w < n && load<u8>(p + w) != 32) w++;
  if ((w == 3 && (startsWith(p, n, "GET") || startsWith(p, n, "DEL") || startsWith(p, n, "SET"))) || (w == 5 && startsWith(p, n, "COUNT"))) {
    txStr("ERR wrong number of arguments\n");
    return;
  }
  txStr("ERR unknown command\n");
}

// ---------------------------------------------------------------------------------------------

export function init(): void {
  configLoad();
  let rs = cfgSize("ring", 1048576);
  if (!(rs >= 4096 && rs <= 16777216) || (<u32>rs & (<u32>rs - 1)) != 0) fatal("ring must be a power of two from 4 KiB to 16 MiB");
  ringSize = <u32>rs;
  ringMask = ringSize - 1;
  let base = sbrk(32 + 2 * <usize>ringSize, 4096);
  if (base == 0) fatal("out of memory for the network rings");
  if (net_init(base, ringSize) != 0) fatal("net_init failed");
  rxH = base; rxD = base + 16; txH = base + 16 + ringSize; txD = txH + 16;
  let keys = cfgSize("keys", 0);
  let c: u32 = 1024;
  while (<f64>c < keys * 2 && c < (1 << 28)) c <<= 1;
  cap = c;
  tab = tableAlloc(cap);
  ccap = 2048;
  ctab = tableAlloc(ccap);
  if (tab == 0 || ctab == 0) fatal("out of memory for the tables");
  outStr("kv: ready, ring="); outU64(ringSize); outStr(" table="); outU64(cap); outByte(10); outFlush();
}

export function run(budget: i32): i32 {
  let done: i32 = 0;
  let limit = budget > 0 ? budget : 1;
  while (done < limit) {
    if (!recActive) {
      let head = rxHead();
      if (head == rxTail()) break;
      let len = rxWord(head);
      let conn = rxWord(head + 4);
      let type = rxWord(head + 8);
      if (type == DATA && len > 0) {
        let st = connGet(conn, false);
        if (st == 0) {
          if (!txControl(conn, CLOSE)) return RUNNING; // retry once tx drains
          store<u32>(rxH, head + REC_HDR + pad4(len));
          continue;
        }
        recActive = true; recLen = len; recOff = 0; recConn = st;
      } else {
        if (type == OPEN) { if (connGet(conn, true) == 0 && !txControl(conn, CLOSE)) return RUNNING; }
        else if (type == CLOSE) {
          // The client went away: acknowledge with our own CLOSE (after every reply already queued),
          // so the host can release its socket instead of holding it half-open.
          if (!txControl(conn, CLOSE)) return RUNNING;
          connDrop(conn);
        }
        store<u32>(rxH, head + REC_HDR + pad4(len));
        done++; // OPEN/CLOSE records use budget too (so a quantum stays short), but are not requests
        continue;
      }
    }
    // process the DATA record [recOff, recLen)
    let st = recConn;
    let conn = load<u32>(st);
    let buf = st + CONN_HDR;
    let bl = load<u32>(st + 4);
    let discarding = load<u32>(st + 8);
    let pos = rxHead() + REC_HDR;
    let stop = false;
    while (recOff < recLen) {
      let c = <u32>load<u8>(rxD + <usize>((pos + recOff) & ringMask));
      if (c == 10) {
        if (done >= limit || !txReserve(conn)) { stop = true; break; }
        if (discarding) txStr("ERR line too long\n");
        else handle(buf, bl);
        bl = 0; discarding = 0;
        done++;
        served++;
      } else if (!discarding) {
        if (bl < LINE_MAX) store<u8>(buf + bl++, <u8>c);
        else discarding = 1;
      }
      recOff++;
    }
    store<u32>(st + 4, bl);
    store<u32>(st + 8, discarding);
    if (stop) break;
    recActive = false;
    store<u32>(rxH, rxHead() + REC_HDR + pad4(recLen));
  }
  txClose();
  if (recActive || rxHead() != rxTail()) return RUNNING;
  return IDLE;
}

export function progress(): i64 {
  return <i64>served;
}
