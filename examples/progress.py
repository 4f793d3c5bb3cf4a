"""One progress display for a run of many training jobs: an overall bar and one line per finished job.

On a terminal (stderr is a TTY) a tqdm bar shows "job k/N: method × domain × seed" with tqdm's ETA, and the current
job's optimizer step. Whatever the terminal, every finished job prints one plain line to stdout, with its own
ETA, so output redirected to a file holds every result and no bar redraws (carriage returns, escape codes).
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def job_name(job: dict) -> str:
    return f"{job['label']} × {job['domain']} × seed {job['seed']}"


class Progress:
    """`start(job)` before a job, `step(n, total)` as it trains, `finish(job, line)` or `skip(job)` after it."""

    def __init__(self, total_jobs: int, enabled: bool = True, bar: bool | None = None, out=None):
        self.total, self.done, self.enabled = total_jobs, 0, enabled
        self.out = out or sys.stdout
        self.started = time.time()
        self.timed_jobs, self.timed_seconds = 0, 0.0  # jobs trained in this process (not skipped), for the ETA
        self.bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_jobs, unit="job", dynamic_ncols=True, file=sys.stderr)

    def start(self, job: dict) -> None:
        self.job_started = time.time()
        if self.bar is not None:
            self.bar.set_description_str(f"job {self.done + 1}/{self.total}: {job_name(job)}", refresh=False)
            self.bar.set_postfix_str("", refresh=True)

    def step(self, step: int, total: int) -> None:
        if self.bar is not None:
            # at most one redraw per tqdm mininterval: a demo step takes milliseconds
            due = time.time() - self.bar.last_print_t >= self.bar.mininterval
            self.bar.set_postfix_str(f"step {step}/{total}", refresh=due)

    def finish(self, job: dict, summary: str) -> None:
        seconds = time.time() - self.job_started
        self.timed_jobs, self.timed_seconds = self.timed_jobs + 1, self.timed_seconds + seconds
        self._line(job, f"{summary} ({seconds:.1f} s)")

    def skip(self, job: dict) -> None:
        self._line(job, "done before this run (results.jsonl)")

    def _line(self, job: dict, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        left = self.total - self.done
        eta = _clock(self.timed_seconds / self.timed_jobs * left) if self.timed_jobs else "?"
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {job_name(job)}, lr ×{job['lr_scale']:g}: {text}"
                f" | elapsed {_clock(time.time() - self.started)}, ETA {eta}")
        if self.bar is not None:
            self.bar.write(line, file=self.out)
            self.bar.update(1)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
