"""Progress of long compiled calls (DTW between long feature sequences).

The compiled kernel reports rows of the DP as it finishes strips of them;
:class:`Progress` turns that into a ``tqdm`` bar or the user's callback.
"""
import numbers
from typing import Any

# below this many cells a call takes well under a second: no automatic bar
AUTO_MIN_CELLS = 2e8


class Progress:
    """Forwards ``rows`` done to a callback ``progress(done, total)`` or a tqdm bar.

    An exception raised by the callback is kept and re-raised by
    :meth:`close` (the kernel cannot stop half-way).
    """

    def __init__(self, progress, total, cells, desc):
        self.total = int(total)
        self.done = 0
        self.error = None
        self.bar = None
        self.callback: Any = None
        if callable(progress):
            self.callback = progress
        elif progress is True or (progress is None and cells >= AUTO_MIN_CELLS):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                # delay: only calls that take longer than a few seconds show a bar
                self.bar = tqdm(total=self.total, desc=desc, unit="row", delay=0 if progress else 3,
                                leave=False)

    def expect(self, total):
        """The kernel about to run will report ``total`` more rows (a value pass: the
        rows; a gradient: twice the rows, forward and reverse)."""
        self.total = self.done + int(total)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    @property
    def active(self):
        return self.bar is not None or self.callback is not None

    def __call__(self, rows):
        self.done += int(rows)
        if self.error is not None:
            return
        try:
            if self.bar is not None:
                self.bar.update(int(rows))
            else:
                self.callback(self.done, self.total)
        except BaseException as exc:  # re-raised by close()
            self.error = exc

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.error is not None:
            raise self.error


def check_progress(progress):
    if progress is None or isinstance(progress, bool) or callable(progress):
        return progress
    raise TypeError(f"progress must be None, a bool or a callable (done, total), got {type(progress).__name__}")


def check_rows(checkpoint):
    if checkpoint is None:
        return None
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, numbers.Integral) or checkpoint < 1:
        raise ValueError(f"checkpoint must be None or a positive integer (rows), got {checkpoint!r}")
    return int(checkpoint)
