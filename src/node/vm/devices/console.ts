/**
 * The console: a byte stream split into lines at `\n` (a newline byte never occurs inside a UTF-8
 * sequence, so splitting bytes is safe). Complete lines are decoded (invalid UTF-8 becomes U+FFFD)
 * and handed to the sink without their `\n`. The unfinished last line is kept as bytes; it is part
 * of the device state (so a line a guest is in the middle of writing is not split by a migration)
 * and is emitted by `flush()` (stop, halt, abort). A partial line longer than
 * CONSOLE_MAX_LINE bytes is emitted as a line of its own so the buffer stays bounded.
 */
export const CONSOLE_MAX_LINE = 64 * 1024;

const decoder = new TextDecoder('utf-8', { fatal: false });

export class ConsoleDevice {
  private partial: Uint8Array;

  constructor(private readonly sink: (line: string) => void, partial?: Uint8Array) {
    this.partial = partial ?? new Uint8Array(0);
  }

  write(bytes: Uint8Array): void {
    let start = 0;
    for (;;) {
      const nl = bytes.indexOf(0x0a, start);
      if (nl < 0) break;
      this.emit(this.join(bytes.subarray(start, nl)));
      start = nl + 1;
    }
    let rest = this.join(bytes.subarray(start));
    while (rest.length > CONSOLE_MAX_LINE) {
      // Cut at a UTF-8 character boundary (never before a continuation byte 10xxxxxx).
      let cut = CONSOLE_MAX_LINE;
      while (cut > CONSOLE_MAX_LINE - 4 && (rest[cut] & 0xc0) === 0x80) cut--;
      this.emit(rest.subarray(0, cut));
      rest = rest.subarray(cut);
    }
    this.partial = rest.slice();
  }

  /** Emits the unfinished line, if any. */
  flush(): void {
    if (this.partial.length === 0) return;
    const line = this.partial;
    this.partial = new Uint8Array(0);
    this.emit(line);
  }

  /** The unfinished line's bytes (for the device state). */
  pending(): Uint8Array {
    return this.partial;
  }

  private join(tail: Uint8Array): Uint8Array {
    if (this.partial.length === 0) return tail;
    const out = new Uint8Array(this.partial.length + tail.length);
    out.set(this.partial);
    out.set(tail, this.partial.length);
    this.partial = new Uint8Array(0);
    return out;
  }

  private emit(line: Uint8Array): void {
    this.sink(decoder.decode(line));
  }
}
