"""`LossHparams`: config.loss read once, frozen, as the losses read it (`hparams.beta`).

A mapping rather than a dataclass of named fields, so that adding a loss adds its
hyperparameters to configs/base.py only (docs/losses.md, "Adding a loss"): every
`config.loss.*` field is here under its own name. The run's resolved lambda weights
(eq. 9 when config.loss.auto_weights) replace the config's with `replace`; the step
carries the result in `StepSettings.hparams`, and the run's config.json records it.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping


class LossHparams(Mapping[str, Any]):
    """Frozen loss hyperparameters: read by attribute (`h.beta`), key (`h["beta"]`) or `get`."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config.loss has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LossHparams are frozen: use replace(...)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return f"LossHparams({self._values!r})"

    def __reduce__(self):
        return LossHparams, (self._values,)

    def replace(self, **changes: Any) -> LossHparams:
        """A copy with `changes` (existing fields only)."""
        unknown = [k for k in changes if k not in self._values]
        if unknown:
            raise KeyError(f"config.loss has no field(s) {unknown}")
        return LossHparams({**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)
