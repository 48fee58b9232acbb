"""The position part of a :class:`~.builder.Pipeline`: epoch numbers and exact resume."""

from __future__ import annotations

from typing import Any

from .epoch import Epoch

__all__ = ["Resumable"]


class Resumable:
    """Where a pipeline's consumer stands, and where its next ``iter()`` starts.

    A base of :class:`~.builder.Pipeline`, which sets these fields in its constructor.
    """

    _epoch: int  # the number of the next epoch
    _skip: int  # source items of it already consumed (a resume)
    _position: Epoch | None  # the epoch whose position state_dict() reports
    _current: Any  # a weak reference to the latest epoch's iterator, or None

    def stop_epoch(self) -> None:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Set the number of the next epoch (it seeds the shuffle)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._skip = 0
        self._position = None

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Return where the consumer stands: ``{"epoch": e, "consumed": k}``.

        ``consumed`` counts source items handed to the consumer (not those merely
        prefetched).  Restoring it with :meth:`load_state_dict` makes the next
        ``iter()`` continue exactly after them.
        """
        ep = self._position
        if ep is not None and not ep.finished:  # running, or broken off mid-epoch
            return {"epoch": ep.epoch, "consumed": ep.position()}
        return {"epoch": self._epoch, "consumed": self._skip}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next ``iter()`` resume from ``state`` (see :meth:`state_dict`).

        Raises:
            ValueError: the state is malformed.
        """
        try:
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a Pipeline state: {state!r:.200}") from None
        if epoch < 0 or consumed < 0:
            raise ValueError(f"not a Pipeline state: {state!r:.200}")
        self.stop_epoch()
        self._current = None
        self._position = None  # state_dict() now reports the loaded state
        self._epoch, self._skip = epoch, consumed
