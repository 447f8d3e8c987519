"""From four sums of one module to a verdict: what the merge actually applied.

With E = W_merged − W_base, D = s·B·A (PEFT's ΔW) and R = E − D accumulated block by block as ‖R‖², ⟨R, D⟩, ‖D‖²
and ‖W_merged‖², the applied scale is c = ⟨E, D⟩ / ‖D‖² = 1 + ⟨R, D⟩ / ‖D‖² (the least-squares multiple of D in E)
and the residual after fitting it is ‖E − cD‖² = ‖R‖² − ⟨R, D⟩² / ‖D‖² (no cancellation: R is small exactly when
the merge is right). A verdict names the nearest explanation: c ≈ 1 with a residual inside the dtype's
rounding is ``exact``; c ≈ 0 ``not_applied``; c ≈ 2 ``applied_twice``; c ≈ √r, 1/√r or another named ratio
``wrong_scale``; c ≈ 1 with a residual far above rounding ``different_base`` (the right update added to other
weights, e.g. QLoRA's de-quantized 4-bit weights against the 16-bit ones); anything else ``residual_unexplained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradience.policy.thresholds import (
    VERIFY_SCALE_ABS_TOL,
    VERIFY_SCALE_REL_TOL,
    VERIFY_SCALE_SE_MULT,
    VERIFY_SCALE_UNDETERMINED_SE,
    VERIFY_UNIT_ROUNDOFF,
)

VERDICTS = ("exact", "not_applied", "applied_twice", "wrong_scale", "different_base", "residual_unexplained")
# Named causes a row may carry as ``reason`` next to its verdict (additive to the v1 rows).
REASONS = {"merged_into_16bit": "different_base: a QLoRA adapter merged into the 16-bit weights instead of the "
                                "de-quantised 4-bit ones it was trained on (unsloth-zoo PR 810; verify/qlora.py)"}


@dataclass
class ModuleSums:
    """Sums over one weight (float64): E = merged − base, D = expected update, R = E − D."""

    rr: float = 0.0      # ‖R‖²
    rd: float = 0.0      # ⟨R, D⟩
    dd: float = 0.0      # ‖D‖²
    mm: float = 0.0      # ‖W_merged‖²
    n: int = 0           # elements

    @property
    def ed(self) -> float:
        """⟨E, D⟩."""
        return self.rd + self.dd

    @property
    def ee(self) -> float:
        """‖E‖²."""
        return max(self.rr + 2 * self.rd + self.dd, 0.0)

    def resid_sq(self, t: float) -> float:
        """‖E − tD‖² = ‖R + (1 − t)D‖²."""
        k = 1.0 - t
        return max(self.rr + 2 * k * self.rd + k * k * self.dd, 0.0)


@dataclass(frozen=True)
class Ratio:
    """A wrong scale worth naming: applied/expected == value."""

    value: float
    label: str


def named_ratios(r: int, scale: float, alpha: float | None, global_scale: float | None) -> list[Ratio]:
    """The scale mistakes seen in converters and servers, as applied/expected ratios for one module.

    rsLoRA confusions give √r or 1/√r (vLLM issue 10798, TensorRT-LLM issues 1477/1668, PEFT PR 3449); merging
    B·A without the α/r factor gives 1/s; an engine that ignores rank_pattern/alpha_pattern applies the config's
    global scale instead of the module's own; an unmerge run instead of a merge gives −1.
    """
    out: list[Ratio] = []  # the specific causes first: on a tie (r = 4 makes 1/sqrt(r) = 1/2) the first wins
    if r > 1:
        root = math.sqrt(r)
        out += [Ratio(root, f"sqrt(r) = {root:.4g} (alpha/sqrt(r) applied where alpha/r is right: rsLoRA scale)"),
                Ratio(1 / root, f"1/sqrt(r) = {1 / root:.4g} (alpha/r applied where alpha/sqrt(r) is right: "
                                "rsLoRA ignored)"),
                Ratio(float(r), f"r = {r} (alpha applied without dividing by r)"),
                Ratio(1.0 / r, f"1/r = {1 / r:.4g} (divided by r twice)")]
    if scale and math.isfinite(scale):
        out.append(Ratio(1.0 / scale, f"1/scale = {1 / scale:.4g} (B·A merged without the alpha/r scale)"))
    if global_scale is not None and scale and not math.isclose(global_scale, scale, rel_tol=1e-9):
        out.append(Ratio(global_scale / scale, f"{global_scale / scale:.4g} (the config's global lora_alpha/r "
                                               "applied: rank_pattern/alpha_pattern ignored)"))
    out += [Ratio(-1.0, "-1 (the update was subtracted: unmerged instead of merged)"),
            Ratio(0.5, "1/2 (half the update)")]
    del alpha  # the alpha-dependent mistakes are expressed through scale
    return [x for x in out if not any(abs(x.value - t) <= VERIFY_SCALE_ABS_TOL for t in (0.0, 1.0, 2.0))]


def rounding_floor(sums: ModuleSums, unit_roundoff: float, r: int, c: float = 1.0) -> float:
    """Largest ‖E − cD‖_F one correct merge in a dtype with this unit roundoff can leave (see thresholds)."""
    return unit_roundoff * math.sqrt(sums.mm) + (2.0 + math.sqrt(r)) * unit_roundoff * abs(c) * math.sqrt(sums.dd)


def unit_roundoff(dtype: str) -> float:
    """Unit roundoff of a safetensors dtype name; torch names (``bfloat16``) of .bin checkpoints too."""
    aliases = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
    return VERIFY_UNIT_ROUNDOFF.get(aliases.get(dtype, dtype), VERIFY_UNIT_ROUNDOFF["F32"])


def _within(c: float, target: float, se: float) -> bool:
    tol = max(VERIFY_SCALE_ABS_TOL if target in (0.0, 1.0, 2.0) else VERIFY_SCALE_REL_TOL * abs(target),
              VERIFY_SCALE_SE_MULT * se)
    return abs(c - target) <= tol


def classify(sums: ModuleSums, *, u: float, r: int, ratios: list[Ratio]) -> dict[str, object]:
    """Verdict and the numbers behind it for one adapted weight."""
    norm_d = math.sqrt(sums.dd)
    norm_w = math.sqrt(sums.mm)
    if sums.dd <= 0.0:  # a zero update (B = 0 as initialised): the merge must leave the weight unchanged
        floor = rounding_floor(sums, u, r)
        verdict = "exact" if math.sqrt(sums.ee) <= floor else "residual_unexplained"
        return {"verdict": verdict, "applied_scale": None, "applied_scale_stderr": None, "residual": None,
                "residual_after_fit": None, "rounding_floor": floor, "update_rel": 0.0,
                "detail": "the adapter's update is zero here; the merged weight " +
                          ("equals the base" if verdict == "exact" else "differs from the base")}
    c = sums.ed / sums.dd
    resid_fit = math.sqrt(max(sums.rr - sums.rd * sums.rd / sums.dd, 0.0))
    se = resid_fit / (math.sqrt(max(sums.n, 1)) * norm_d)
    residual = math.sqrt(max(sums.rr, 0.0))

    def resid_at(target: float) -> float:
        return math.sqrt(sums.resid_sq(target))

    out: dict[str, object] = {"applied_scale": c, "applied_scale_stderr": se, "residual": residual / norm_d,
                              "residual_after_fit": resid_fit / norm_d,
                              "rounding_floor": rounding_floor(sums, u, r) / norm_d,
                              "update_rel": norm_d / norm_w if norm_w > 0 else None}
    below = rounding_floor(sums, u, r) >= norm_d
    if below:
        out["below_rounding"] = True

    def done(verdict: str, detail: str) -> dict[str, object]:
        out["verdict"] = verdict
        out["detail"] = detail
        return out

    if se > VERIFY_SCALE_UNDETERMINED_SE:
        return done("residual_unexplained", f"W_merged − W_base is {resid_fit / norm_d:.3g}x the update away from "
                                            f"any multiple of it; the applied scale is undetermined (c = {c:.3g} "
                                            f"± {se:.2g})")
    if _within(c, 1.0, se):
        floor = rounding_floor(sums, u, r)
        if residual <= floor:
            note = (" (the update is below the dtype's rounding: exact, but not distinguishable from an unmerged "
                    "weight by the residual alone)" if below else "")
            return done("exact", f"W_merged = W_base + s·B·A within the stored dtype's rounding{note}")
        return done("different_base", f"the update is present at the right scale (c = {c:.4f}) but "
                                      f"W_merged − W_base − s·B·A is {residual / norm_d:.3g}x the update "
                                      f"(rounding allows {floor / norm_d:.2g}x): merged onto other weights than "
                                      "this base (e.g. a QLoRA adapter merged into 16-bit weights instead of its "
                                      "de-quantized 4-bit ones), or changed after merging")
    fixed = [(0.0, "not_applied", "c ≈ 0: the merged weight is the base weight; the update was not applied"),
             (2.0, "applied_twice", "c ≈ 2: the update was applied twice")]
    for target, verdict, detail in fixed:
        if _within(c, target, se) and resid_at(target) <= rounding_floor(sums, u, r, target):
            return done(verdict, detail)
    best = min(ratios, key=lambda x: abs(c - x.value), default=None)
    if best is not None and _within(c, best.value, se) and resid_at(best.value) <= rounding_floor(
            sums, u, r, best.value):
        out["scale_ratio"] = best.value
        return done("wrong_scale", f"applied {c:.4g}x the update: {best.label}")
    if resid_fit <= rounding_floor(sums, u, r, c):
        out["scale_ratio"] = c
        return done("wrong_scale", f"applied {c:.4g}x the update (no known cause matches this ratio)")
    return done("residual_unexplained", f"c = {c:.4g}; W_merged − W_base − c·s·B·A is still {resid_fit / norm_d:.3g}x "
                                        "the update, far above rounding")
