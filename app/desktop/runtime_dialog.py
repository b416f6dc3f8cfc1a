"""The progress window that builds the engine runtime on first use (installed app only).

Contract
--------
``RuntimeDialog(runtime)`` is a modal dialog that runs ``runtime.ensure(progress, cancel, backend)``
(:class:`app.runtime.build.Runtime`, or anything with its :class:`Builder` methods) in a
:class:`QThread`, and shows its progress bar, the current line and the last lines of output.
**Cancel** sets the cancel event (the build stops within a fraction of a second; what was
downloaded stays for the next attempt) and rejects the dialog once the build has stopped.  **Use
CPU instead** (shown while a CUDA runtime is being built) cancels the build and starts the CPU one.
A failed build shows its one-sentence reason (the step that failed and uv's own error) in red, the
details below it, and offers **Retry** (it resumes from what was downloaded) and **Close**.  On
success the dialog accepts itself.  :func:`ensure_runtime` returns at once when the runtime is
ready, else shows the dialog and says whether the runtime is ready afterwards.

No torch here, only :mod:`app.runtime.build` (uv and a Python child do the work).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from PySide6.QtCore import QThread, Signal
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.runtime.build import Cancelled, Progress, Runtime, RuntimeProblem, State
from app.runtime.locks import Lock

LOG_LINES = 200  # lines of uv's output kept in the details box
INTRO = (
    "MoLink installs its engine (PyTorch and the model runtime) once for this user. "
    "This downloads a few hundred MB (a few GB for an NVIDIA GPU)."
)
FAILED = "MoLink could not install its engine. Retry resumes from what was already downloaded."


class Builder(Protocol):
    """What the dialog uses of :class:`app.runtime.build.Runtime`."""

    def lock_for(self, backend: str | None = None) -> Lock: ...

    def state(self, lock: Lock) -> State: ...

    def ensure(self, progress: Progress, cancel: threading.Event, backend: str | None) -> Path: ...


class _Build(QThread):
    progress = Signal(object, str)  # fraction (float or None), line
    done = Signal(str)  # the runtime's Python
    failed = Signal(str)  # one sentence
    cancelled = Signal()

    def __init__(self, runtime: Builder, backend: str | None) -> None:
        super().__init__()
        self.runtime, self.backend = runtime, backend
        self.cancel = threading.Event()

    def run(self) -> None:
        try:
            python = self.runtime.ensure(lambda f, line: self.progress.emit(f, line), self.cancel, self.backend)
        except Cancelled:
            self.cancelled.emit()
        except RuntimeProblem as e:
            self.failed.emit(str(e))
        except Exception as e:  # noqa: BLE001 - an unexpected error is still one sentence in the window
            self.failed.emit(f"{type(e).__name__}: {e}")
        else:
            self.done.emit(str(python))


class RuntimeDialog(QDialog):
    def __init__(self, runtime: Builder, backend: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runtime = runtime
        self.backend = backend
        self.python: str | None = None
        self.error: str | None = None
        self._build: _Build | None = None
        self._switch_to_cpu = False
        self._closing = False
        self.setWindowTitle("MoLink: installing the engine")
        self.setMinimumWidth(520)
        self.headline = QLabel(INTRO)
        self.headline.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.line = QLabel("")
        self.line.setWordWrap(True)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setMaximumBlockCount(LOG_LINES)
        self.details.setMinimumHeight(140)
        self.cpu_button = QPushButton("Use CPU instead")
        self.cpu_button.setToolTip("Install the smaller CPU engine now; the GPU one can be installed later")
        self.cpu_button.clicked.connect(self.use_cpu)
        self.retry_button = QPushButton("Retry")
        self.retry_button.clicked.connect(self.start)
        self.retry_button.hide()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.cpu_button)
        buttons.addStretch(1)
        buttons.addWidget(self.retry_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.headline)
        layout.addWidget(self.bar)
        layout.addWidget(self.line)
        layout.addWidget(self.details)
        layout.addLayout(buttons)

    # ------------------------------------------------------------------ the build
    def start(self) -> None:
        if self._build is not None and self._build.isRunning():
            return
        self.error = None
        self.headline.setText(INTRO)
        self.retry_button.hide()
        self.cancel_button.setText("Cancel")
        self.cancel_button.setEnabled(True)
        self.line.setStyleSheet("")
        try:
            lock = self.runtime.lock_for(self.backend)
        except RuntimeProblem as e:
            self._failed(str(e))
            return
        self.cpu_button.setVisible(lock.backend != "cpu")
        self._build = _Build(self.runtime, self.backend)
        self._build.progress.connect(self._progress)
        self._build.done.connect(self._done)
        self._build.failed.connect(self._failed)
        self._build.cancelled.connect(self._cancelled)
        self._build.start()

    def _progress(self, fraction: float | None, line: str) -> None:
        if fraction is not None:
            self.bar.setValue(int(fraction * 1000))
        self.line.setText(line if len(line) < 200 else line[:197] + "...")
        self.details.appendPlainText(line)

    def _done(self, python: str) -> None:
        self.python = python
        self.bar.setValue(1000)
        self._wait()
        self.accept()

    def _failed(self, why: str) -> None:
        self._wait()
        self.error = why
        self.headline.setText(FAILED)
        self.line.setText(why.splitlines()[0] if why else "the engine could not be installed")
        self.line.setStyleSheet("color: #c62828;")
        self.details.appendPlainText(why)
        self.retry_button.show()
        self.cancel_button.setText("Close")

    def _cancelled(self) -> None:
        self._wait()
        if self._switch_to_cpu:
            self._switch_to_cpu = False
            self.backend = "cpu"
            self.details.appendPlainText("switching to the CPU engine")
            self.start()
            return
        self.reject()

    def _wait(self) -> None:
        if self._build is not None:
            self._build.wait(30_000)  # the build has returned (its signal came last); this only joins the thread

    # ------------------------------------------------------------------ buttons
    def use_cpu(self) -> None:
        self.cpu_button.hide()
        if self._build is not None and self._build.isRunning():
            self._switch_to_cpu = True
            self._build.cancel.set()
        else:
            self.backend = "cpu"
            self.start()

    def cancel(self) -> None:
        if self._build is not None and self._build.isRunning():
            self.cancel_button.setEnabled(False)
            self.line.setText("cancelling (downloads so far are kept) ...")
            self._build.cancel.set()
        else:
            self.reject()

    def reject(self) -> None:  # Esc and the window's close button cancel too
        if self._build is not None and self._build.isRunning():
            self.cancel()
            return
        super().reject()

    def exec(self) -> int:  # noqa: A003 - QDialog's name
        self.start()
        return super().exec()


def ensure_runtime(parent: QWidget | None = None, runtime: Builder | None = None) -> bool:
    """True when the runtime is ready (at once, or after the dialog built it); False when the
    user closed the dialog (cancelled, or gave up after a failure)."""
    runtime = runtime or Runtime.default()
    try:
        if runtime.state(runtime.lock_for()) is State.READY:
            return True
    except RuntimeProblem:
        pass  # the dialog shows why
    dialog = RuntimeDialog(runtime, parent=parent)
    return dialog.exec() == QDialog.DialogCode.Accepted
