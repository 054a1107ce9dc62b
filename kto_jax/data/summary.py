"""The resolved dataset summary: what was read, kept, dropped and why, and λ advice.

`DataSummary.lines()` is what `kto-jax data inspect` prints and what the trainer
logs at start-up; the numeric fields (n_desirable, padding efficiency, ...) are
there for programs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kto_jax.data.tokenize import TokenReport

PERCENTILES = (50, 90, 99, 100)


@dataclasses.dataclass
class SplitSummary:
    """One split (train or eval) from rows to batches."""
    name: str
    source: str                      # where the rows came from (file, or share of train)
    rows: int                        # records read for this split
    examples: int                    # after normalisation (pairs unpaired, one_y_per_x)
    subsampled: dict[str, int]       # class -> examples removed by data.*_fraction
    tokens: TokenReport
    kept: int                        # examples (or pairs) left for batching
    n_desirable: int
    n_undesirable: int
    paired: bool
    lengths: dict[str, np.ndarray]   # "prompt" | "completion" | "total" -> PERCENTILES values
    batches_per_epoch: int
    plan: dict                       # batching.plan_stats of epoch 0

    def lines(self) -> list[str]:
        unit = "pairs" if self.paired else "examples"
        out = [f"{self.name}: {self.source}: {self.rows} rows -> {self.examples} {unit} -> "
               f"{self.kept} kept"]
        if self.paired:
            out.append(f"  {self.kept} preference pairs (paired loss: chosen and rejected "
                       "stay together)")
        else:
            out.append(f"  n_D = {self.n_desirable} desirable, n_U = {self.n_undesirable} "
                       "undesirable")
        out.extend(self._dropped_lines())
        out.extend(_length_table(self.lengths, self.paired))
        out.extend(self._batch_lines())
        return out

    def _dropped_lines(self) -> list[str]:
        out = []
        for cls, n in self.subsampled.items():
            if n:
                out.append(f"  dropped {n} {cls} examples (data.{cls}_fraction)")
        for reason, n in self.tokens.dropped_count.items():
            out.append(f"  dropped {n}: {reason}, e.g.")
            out.extend(f"    {example}" for example in self.tokens.dropped[reason])
        if self.tokens.prompts_truncated:
            out.append(f"  truncated {self.tokens.prompts_truncated} prompts from the left to "
                       "data.max_prompt_length")
        if self.tokens.completions_truncated:
            out.append(f"  truncated {self.tokens.completions_truncated} completions to fit "
                       "data.max_length")
        if self.tokens.boundary_retokenized:
            out.append(f"  note: {self.tokens.boundary_retokenized} conversations tokenize "
                       "differently across the prompt/completion seam when tokenized whole; "
                       "their completion uses its own tokens after the prompt's (as at "
                       "generation time)")
        if not out:
            out.append("  nothing dropped or truncated")
        return out

    def _batch_lines(self) -> list[str]:
        plan = self.plan
        shapes = ", ".join(f"{p}x{c}: {n}" for (p, c), n in sorted(plan["shapes"].items()))
        plural = "es" * (self.batches_per_epoch != 1)
        packed = plan.get("packed")
        if packed:
            rows = ", ".join(f"{c}x{t}x{r}: {n}" for (c, t, r), n in packed["rows"].items())
            out = [f"  {self.batches_per_epoch} global batch{plural} per epoch; packed, shapes "
                   f"CxTxR (completion bucket x row length x rows per microbatch, batches): {rows}",
                   f"  packed rows: fill {100 * packed['fill']:.1f}%, token efficiency "
                   f"{100 * packed['token_efficiency']:.1f}% (real tokens / computed positions; at most "
                   f"{100 * packed['ceiling']:.1f}% with these examples); padded layout: "
                   f"{100 * plan['token_efficiency']:.1f}%"]
        else:
            out = [f"  {self.batches_per_epoch} global batch{plural} per epoch; shapes PxC (batches): "
                   f"{shapes}; padding efficiency {100 * plan['token_efficiency']:.1f}% (real "
                   "tokens / positions the step computes, the KL or second completion's forward "
                   "counted; data.packing=True computes fewer)"]
        if plan["remainder_dropped"]:
            out.append(f"  {plan['remainder_dropped']} examples of each epoch's last partial "
                       "batch are skipped (data.drop_remainder; a different set each epoch)")
        if plan["filler_rows"]:
            out.append(f"  {plan['filler_rows']} filler rows (valid=False) pad the last batch")
        if not self.paired and plan["single_class_batches"]:
            out.append(f"  {plan['single_class_batches']} of {plan['batches']} batches hold a "
                       "single class")
        return out


@dataclasses.dataclass
class DataSummary:
    """Everything `build_datasets` resolved, for logs, `data inspect` and the trainer.

    `desirable_weight` / `undesirable_weight` are the λ to train with: the configured
    ones, or eq. 9's when `loss.auto_weights` is set and both classes are present (the
    rule of `kto_jax.losses.balanced_weights`).
    """
    format: str
    conversational: bool
    paired: bool
    loss: str
    train: SplitSummary
    eval: SplitSummary | None
    eval_note: str
    desirable_weight: float
    undesirable_weight: float
    recommended_weights: tuple[float, float] | None
    weight_ratio: float | None
    batch_shape: tuple[int, int, int]    # (A, M, M_local)
    fingerprint: str
    warnings: list[str] = dataclasses.field(default_factory=list)
    shapes_line: str = ""                # the shapes chosen from the data (data/shapes.py), if any
    uses_lambda_weights: bool = True     # the loss weighs its classes by lambda_D / lambda_U
    auto_weights_applied: bool = False   # the weights above are eq. 9's (loss.auto_weights)

    @property
    def n_desirable(self) -> int:
        return self.train.n_desirable

    @property
    def n_undesirable(self) -> int:
        return self.train.n_undesirable

    def lines(self) -> list[str]:
        style = "conversational" if self.conversational else "text"
        a, m, local = self.batch_shape
        out = [f"format: {self.format} ({style}); loss {self.loss} uses "
               f"{'paired' if self.paired else 'unpaired'} batches [A={a}, M={m}] "
               f"({local} rows of each microbatch per process)"]
        out += self.train.lines()
        if self.shapes_line:
            out.append(self.shapes_line)
        out += self.eval.lines() if self.eval is not None else [f"eval: {self.eval_note}"]
        out += self._lambda_lines()
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def _lambda_lines(self) -> list[str]:
        if self.paired:
            return []
        if not self.uses_lambda_weights:
            return [f"lambda: loss {self.loss} does not weigh the classes (lambda_D, lambda_U "
                    "and loss.auto_weights are unused)"]
        ratio = "undefined" if self.weight_ratio is None else f"{self.weight_ratio:.3f}"
        source = " (eq. 9, applied by loss.auto_weights)" if self.auto_weights_applied else ""
        out = [f"lambda: training with lambda_D={self.desirable_weight:.4g}, lambda_U="
               f"{self.undesirable_weight:.4g}{source}: lambda_D*n_D/(lambda_U*n_U) = {ratio}"]
        if self.recommended_weights is not None and not self.auto_weights_applied:
            lam_d, lam_u = self.recommended_weights
            out.append(f"  eq. 9 recommends lambda_D={lam_d:.4g}, lambda_U={lam_u:.4g} "
                       "(ratio in [1, 4/3]; loss.auto_weights=True applies it)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def length_percentiles(prompt: np.ndarray, completion: np.ndarray, total: np.ndarray
                       ) -> dict[str, np.ndarray]:
    """Token-length percentiles (PERCENTILES) after truncation, per part."""
    def pct(x):
        return np.percentile(x, PERCENTILES).round().astype(int) if len(x) else np.zeros(4, int)
    return {"prompt": pct(prompt), "completion": pct(completion), "total": pct(total)}


def _length_table(lengths: dict[str, np.ndarray], paired: bool) -> list[str]:
    head = "  lengths (tokens)      " + "".join(f"{'p' + str(p) if p < 100 else 'max':>7}"
                                                for p in PERCENTILES)
    rows = [head]
    for name, values in lengths.items():
        label = "completion (longer)" if (paired and name == "completion") else name
        rows.append(f"    {label:<20}" + "".join(f"{int(v):>7}" for v in values))
    return rows
