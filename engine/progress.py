"""Progress with an ETA for long work (the warm start logs its own steps, as training does).

On a terminal: one line, rewritten in place (\\r) and cleared when done. In a log file: a line
at each quarter, so a CI log or `nohup` output shows the work moving without a line per item.
"""
import sys
import time


class Progress:
    def __init__(self, label: str, total: int, *, stream=None, quiet: bool = False):
        self.label, self.total, self.stream = label, max(total, 1), stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quiet, self.t0, self.shown = quiet, time.time(), 0

    def update(self, done: int):
        if self.quiet:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - done)
        line = f"{self.label}: {done}/{self.total} ({elapsed:.0f}s, eta {eta:.0f}s)"
        if self.tty:
            self.stream.write("\r" + line + " " * 8)
            self.stream.flush()
        elif 4 * done // self.total > self.shown:  # each quarter once
            self.shown = 4 * done // self.total
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()
