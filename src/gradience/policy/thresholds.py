"""Every rule threshold and rule constant of the product, in one place.

Rules in ``gradience.policy`` and the run analysis in ``gradience.monitor`` import from here; nothing else
hard-codes a threshold. Each constant names the SPEC rule it serves.
"""

from __future__ import annotations

# --- shared learning-rate anchors ------------------------------------------------------------------
LR_CONSERVATIVE = 5e-5          # the "safe" LoRA lr we suggest moving toward
LR_HIGH = 1e-4                  # above this, hard-reasoning runs get `lower_lr`
LR_MAX_SANE = 1e-2              # lr above this is almost surely a units mistake (error)
LR_EASY_CLASSIFICATION_MAX = 5e-4

# --- check (SPEC §7) ------------------------------------------------------------------------------
R_DEFAULT_SUGGESTION = 8        # when r is unset
R_LARGE = 32                    # r >= this: consider_reduce_rank
R_MEDIUM = 16                   # 16 < r < 32: consider_reduce_rank (softer)
R_EASY_CLASSIFICATION_MAX = 16  # easy_classification with r above this: suggest r=4..8
R_EASY_CLASSIFICATION_SUGGESTED = (4, 8)
RSLORA_SMALL_R = 8              # rsLoRA with r <= this barely differs from plain LoRA scaling
ALPHA_OVER_R_HIGH = 1.0         # alpha/r >= this at lr > LR_HIGH: info
PEFT_DEFAULT_LORA_ALPHA = 8.0   # PEFT's LoraConfig default when lora_alpha is not given (set_alpha evidence)
LR_GENERATION_HIGH = 3e-4       # generation: lr above this -> lower_lr (warning)
LR_GENERATION_SUGGESTED = 1e-4  # generation calibration probe lr
R_GENERATION_SUGGESTED = 16     # generation calibration probe rank
CALIBRATION_PROBE_STEPS = (100, 200)  # suggested length of a calibration probe run, in optimizer steps
# LoRA update scale (alpha/r, or alpha/sqrt(r) with rsLoRA) outside [LOW, HIGH] at any lr: warning fix_alpha_scale.
# Common choices are 1-2 (alpha = r or 2r); 0.25 is PEFT's default alpha=8 at r=32 (the update is quartered), 64 a
# unit slip (alpha=512 at r=8) that multiplies the effective lr by 32 against alpha = 2r.
ALPHA_SCALE_EXTREME_LOW = 0.25  # scale <= this
ALPHA_SCALE_EXTREME_HIGH = 16.0  # scale >= this
LR_UNKNOWN_PROFILE_HIGH = 5e-4  # unknown profile: lr above this is high for every profile (warning lower_lr)
KEY_TYPO_CUTOFF = 0.85          # difflib ratio at which an unknown config key counts as a misspelling

# --- check rules from evidence (issue 18; citations in gradience/policy/sources.py) -----------------------------
# LoRA learning rate. Schulman et al. 2025 ("LoRA Without Regret"): the optimal LoRA lr is ~10x the full-FT lr,
# nearly independent of rank; 1e-4 ... 5e-4 is the common band for 1-10B models (Hu et al. 2021 used 2e-4 ... 5e-4
# on GPT-2 / RoBERTa; QLoRA 1e-4 / 2e-4). Only clearly harmful values warn.
LR_LORA_BAND = (1e-4, 5e-4)          # the common band, quoted in messages
LR_LORA_SUGGESTED = 2e-4             # suggested when the lr is unset (10x a typical 2e-5 full-FT lr)
LR_LORA_HARMFUL_HIGH = 1e-3          # models >= 1B params (and unknown size): lr above this -> lower_lr (warning)
LR_LORA_HARMFUL_HIGH_SMALL = 3e-3    # models known to be < 1B: smaller widths take larger steps (Schulman 2025:
                                     # the optimal lr falls with width) -> lower_lr above this
LR_LORA_SMALL_MODEL_PARAMS = 1e9     # the size that separates the two bounds above
LR_FULL_FT_MAX = 1e-5                # lr <= this: probably a full-fine-tuning lr (LoRA wants ~10x) -> raise_lr
# rsLoRA (Kalajdzievski 2023): with alpha/r the update's scale collapses as r grows; at r >= this without
# use_rslora: consider_rslora (info).
R_RSLORA_SUGGEST = 64
ALPHA_OVER_R_COMMON = 2.0            # alpha = 2r: common practice (QLoRA, PEFT examples), quoted in messages
# MoE (PEFT docs, "MoE expert parameters and vLLM"): expert rank = max(1, r // num_experts) keeps the adapter's
# parameter budget close to a dense layer's; expert targets at the full r: reduce_expert_rank (info).
MOE_MIN_EXPERTS = 2

# --- monitor (SPEC §6) ----------------------------------------------------------------------------
GAP_THRESHOLD = 1.5             # test_ppl / train_ppl at or above this: memorization_detected
UNDERFIT_GAP_MAX = 1.2          # gap below this ...
UNDERFIT_TEST_ACC_MAX = 0.2     # ... test accuracy below this ...
UNDERFIT_STABLE_RANK_MAX = 2.0  # ... and stable rank below this: possible underfitting
LOW_UTILIZATION = 0.25          # mean utilization below this with r >= LOW_UTILIZATION_MIN_R
LOW_UTILIZATION_MIN_R = 16
COMPRESS_K90_FRACTION = 0.5     # k90_p90 <= r * this (with r >= LOW_UTILIZATION_MIN_R): compress_rank
MLP_UTILIZATION_LOW = 0.10      # MLP utilization below this ...
ATTN_OVER_MLP_UTILIZATION = 2.0  # ... and attention utilization >= this multiple: compress_mlp_targets
LOSS_SPIKE_FACTOR = 3.0         # a loss above this multiple of the running median is a spike
LOSS_SPIKE_WINDOW = 20          # running-median window for spikes, in train steps
GRAD_EXPLOSION_FACTOR = 10.0    # grad norm above this multiple of the running median is an explosion
LOSS_TREND_WINDOW = 20          # train steps used for the recent loss trend
RUNNING_MEDIAN_MIN_HISTORY = 5  # spikes / explosions are judged only once this many earlier values exist
LOSS_TREND_FLAT_TOLERANCE = 0.02  # |relative loss change over the trend window| below this: "flat"
OVERFIT_MIN_RISE = 0.01         # test loss this fraction above its minimum counts as "rising"
LR_SCHEDULE_REL_TOL = 1e-6      # lr changes smaller than this (relative) are not warmup/decay
TEST_SPLIT_FALLBACKS = ("val", "validation", "eval", "valid", "dev")  # stand-ins for a missing "test"
# Run-failure signatures (issue 18 item 5; sources in gradience/policy/sources.py).
CLIP_SATURATED_WINDOW = 10      # grad norm >= max_grad_norm on this many consecutive logged steps: clipping_saturated
CLIP_SATURATED_RTOL = 1e-6      # "at max_grad_norm" allows this relative rounding (post-clip loggers)
FROZEN_GRAD_WINDOW = 5          # grad norm exactly 0 on this many consecutive logged steps: frozen_adapter

# --- guard (SPEC §16): defaults of GradienceCallbackConfig(guard=True, ...) --------------------------
GUARD_SNAPSHOT_EVERY = 10       # optimizer steps between CPU snapshots of the trainable state
GUARD_RING = 2                  # snapshots kept (older ones are tried when the newest fails again)
GUARD_SPIKE_FACTOR = 5.0        # a single-step loss above this x the running median triggers a rollback
                                # (stricter than monitor's 3x: it acts on unsmoothed per-step losses)
GUARD_SPIKE_WINDOW = LOSS_SPIKE_WINDOW  # running-median window (accepted steps)
GUARD_MIN_HISTORY = RUNNING_MEDIAN_MIN_HISTORY  # spikes judged only after this many accepted steps
GUARD_LR_FACTOR = 0.5           # lr multiplier applied at each rollback
GUARD_MAX_ROLLBACKS = 3         # rollbacks allowed within GUARD_WINDOW steps; one more trigger stops training
GUARD_WINDOW = 100              # optimizer steps

# --- audit (SPEC §3) ------------------------------------------------------------------------------
ALLOWED_RANKS_DEFAULT = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Rank bombs (issue 9): a pair whose factors share a dimension above MAX_FACTOR_RANK, or above the layer's
# smaller dimension by more than a small rank (PEFT accepts r=8 on a 2-class head), is `shape_mismatch`,
# refused from the header before the r x r Gram is allocated (r = 4096: a 128 MiB Gram, seconds to solve).
MAX_FACTOR_RANK = 4096
RANK_ABOVE_DIM_MAX = 64
# MoE expert LoRA (issue 21): a PEFT target_parameters factor stacks E experts' ranks (r·E rows). Public MoE bases
# have at most 384 routed experts (Kimi K2 config.json n_routed_experts=384; DeepSeek-V3 256, Qwen3-MoE 128); a
# header claiming more than this is refused before any slice is made.
MAX_EXPERTS = 4096
# An expert whose ‖ΔW_e‖_F is at most this fraction of its parameter's median expert is "never adapted": PEFT
# starts B at 0 (LoRA §4.1), so an expert the router never picked keeps exactly 0; 1e-3 of the median (a 60 dB
# energy gap) also catches experts that saw a handful of tokens, far below any trained sibling.
EXPERT_NEGLIGIBLE_REL = 1e-3
# QLoRA merge residual (issue 21 item 2): a layer whose ‖W₁₆ − deq(Q(W₁₆))‖_F is at least this multiple of its
# update ‖s·B·A‖_F gets a "merge into the de-quantised base" warning: at ρ ≥ 1 the residual a merge into the
# 16-bit weights adds is as large as the update itself (unsloth-zoo PR 810 measured 10-150x on some layers).
QLORA_RESIDUAL_MAX = 1.0
ENERGY_LEVELS = (0.90, 0.95, 0.99)
SUGGEST_MARGIN_DEFAULT = 1.0
# σ from the r×r Gram eigen-solve lose ~sqrt(eps)·σ₁ on tiny values: when λ_min < this·λ_max the pair's σ
# are recomputed by Householder QR of both factors (exact to ~eps·σ₁; ~8x slower, so only when needed).
SPECTRUM_QR_REFINE_RATIO = 1e-8
# The audit's square root of a factor from its Gram is accurate to ~eps·‖X‖/sqrt(ratio) when the Gram's
# λ_min >= this·λ_max (~2e-13·‖X‖ at 1e-6); the directions below are recomputed from the data (audit/spectrum.py).
SPECTRUM_FACTOR_SPLIT_RATIO = 1e-6
# Energy-rank targets count as reached within this relative rounding slack (hand-computed ties stay exact).
ENERGY_RANK_RTOL = 1e-10
TOP_WASTEFUL_TEXT_DEFAULT = 5   # rows of "Most wasteful layers" in text output without --top-wasteful
TOP_UDR_TEXT = 5                # modules listed in the text UDR block

# --- UDR / SDI (SPEC §4) --------------------------------------------------------------------------
UDR_SIGMA_RTOL = 1e-4           # relative accuracy of the base weight's σ₁ (iterative, never a full SVD)
UDR_SDI_EPS = 1e-12             # sdi = log10(udr + eps): a zero update gives sdi = -12, not -inf
UDR_FRACTION_LEVELS = (0.1, 0.3)  # fraction_udr_gt_0_1 / _0_3 (strict >)
# A base whose every matrix has σ₁·√(mn)/(‖W‖_F(√m+√n)) below this sits at the i.i.d. random-matrix edge (≈ 1 at
# init, Bai & Yin 1988): audit flags base_looks_random_init next to UDR (udr/init_scale.py).
UDR_RANDOM_INIT_EDGE_RATIO = 1.3
# A non-float32 base tensor whose float32 copy would exceed this is streamed (converted block by block on every
# pass) instead of converted once: bounded memory for huge tensors, the faster convert-once path below it.
UDR_STREAM_MIN_BYTES = 1 << 30

# --- compress (SPEC §12) --------------------------------------------------------------------------
# The Gram-coefficient split divides by σ_k^½; below this σ_k/σ₁ the QR path (factored_svd) is used instead.
COMPRESS_GRAM_SIGMA_RATIO = 1e-6
# A kept (untruncated) layer is copied byte for byte when its scale change |c - 1| is below this.
COMPRESS_SCALE_RTOL = 1e-12
# Modules listed in the text table of the largest reductions.
COMPRESS_TEXT_TOP_LAYERS = 10

# --- compare (SPEC §13) ---------------------------------------------------------------------------
COMPARE_TOP_DEFAULT = 10        # modules in the text table (and in summary.biggest_udr_differences)
# Singular directions below this·σ₁ are numerical noise (the shared-basis reduction is exact to ~1e-8 of the
# factor norms): k never reaches into them, so an overlap is never computed on arbitrary vectors.
COMPARE_SIGMA_NOISE_RTOL = 1e-6
COMPARE_MAX_WORKERS = 4          # modules compared in parallel threads (GRADIENCE_COMPARE_WORKERS overrides)

# --- merge (issue 19) -----------------------------------------------------------------------------
# TIES trim: keep the top 20% of each update's entries by magnitude (Yadav et al. 2023, "TIES-Merging", §3 and
# §5: k = 20 is their default; PEFT's add_weighted_adapter takes it as ``density``).
MERGE_TIES_DENSITY_DEFAULT = 0.2
# DARE drop rate p (Yu et al. 2024, "Language Models are Super Mario", §4: p = 0.9 is their main setting;
# survivors are rescaled by 1/(1-p)).
MERGE_DARE_DROP_DEFAULT = 0.9
MERGE_MAX_INPUTS = 64            # adapters in one merge (each module's work grows with the summed rank)
MERGE_TEXT_TOP_MODULES = 10      # modules listed in the text output (most interfering first)
# A merged module whose ‖ΣwᵢΔWᵢ‖_F is below this × Σ‖wᵢΔWᵢ‖_F is reported as cancelled (zero_update): the Gram
# path resolves σ to ~1e-8 of the factor norms in the worst case (audit/spectrum.py, compare/subspace.py).
MERGE_CANCEL_RTOL = 1e-7
# ties/dare re-factorisation: a Gram side up to this size is eigen-decomposed exactly; above it the top-k directions
# come from subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with k + max(k, this) vectors, stopped
# when the captured energy sum_{i<=k} sigma_i^2 changes by less than the rtol (relative), at most MAX_ITER passes.
MERGE_EXACT_EIGH_MAX = 1024
MERGE_SUBSPACE_OVERSAMPLE = 64
MERGE_SUBSPACE_RTOL = 1e-13
MERGE_SUBSPACE_MAX_ITER = 100

# --- bench (SPEC §15) ---------------------------------------------------------------------------------------
BENCH_TOLERANCE_DEFAULT = 0.005     # an arm PASSes when Δ ≥ −tolerance (the reference tool's acc_tolerance)
BENCH_MIN_PASS_RATE = 2.0 / 3.0     # policy verdict: pass rate across seeds at least this ...
BENCH_BOOTSTRAP_SAMPLES = 2000      # ... paired-bootstrap resamples for the 95% interval on Δ
BENCH_BOOTSTRAP_SEED = 0            # fixed RNG seed: the same per-item results give the same interval
BENCH_CI_LEVEL = 0.95
# Headline verdicts test the interval (issue 18): PASS when its lower bound ≥ −tolerance (non-inferiority: Piaggio
# et al. 2012, CONSORT extension for non-inferiority trials, JAMA 308:2594), FAIL when its upper bound < −tolerance,
# else INCONCLUSIVE with n ≈ n_now·(half-width/margin)² eval items needed (Chow, Shao & Wang 2008, Sample Size
# Calculations in Clinical Research, §3.1); an answer above this many items is reported as not reachable (None).
BENCH_ITEMS_NEEDED_MAX = 100_000_000
BENCH_SMOKE_MAX_STEPS = 30          # --smoke defaults when the config has no runtime.smoke_* keys
BENCH_SMOKE_TRAIN_SAMPLES = 256
BENCH_SMOKE_EVAL_SAMPLES = 200

# --- verify (issue 20) ----------------------------------------------------------------------------
# Unit roundoff 2^-p of each stored float dtype (p = significand bits incl. the implicit one: IEEE 754 binary16/32/64,
# bfloat16 = the top 16 bits of binary32). Rounding a value x to the dtype moves it by at most u·|x|, so one merge
# W' = round(W + ΔW) is exact when ‖W' − W − ΔW‖_F ≤ u·‖W'‖_F + (2 + √r)·u·‖ΔW‖_F: the first term is the final
# rounding, the second the rounding of ΔW = s·B·A itself (PEFT's Linear.merge computes get_delta_weight in fp32 on
# CPU for fp16/bf16 weights, in the weight's dtype elsewhere, then adds: peft/tuners/lora/layer.py).
VERIFY_UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}
# The applied scale c = <W' − W, ΔW> / ‖ΔW‖² is compared with 0 (not applied), 1, 2 (applied twice) and the named
# wrong ratios (√r, 1/√r, ...) within max(absolute/relative tolerance, VERIFY_SCALE_SE_MULT standard errors of c);
# the standard error of c is ‖W' − W − cΔW‖_F / (√n ‖ΔW‖_F) for a residual uncorrelated with ΔW.
VERIFY_SCALE_ABS_TOL = 0.02
VERIFY_SCALE_REL_TOL = 0.02
VERIFY_SCALE_SE_MULT = 4.0
# c's standard error above this: the residual swamps the update and c is not determined (residual_unexplained).
VERIFY_SCALE_UNDETERMINED_SE = 0.25
# GGUF round trip (verify --gguf): ‖ΔW_gguf − ΔW_peft‖_F / ‖ΔW_peft‖_F at most this for f32 files; f16/bf16 files
# get the unit roundoff of their dtype times 4 (each factor rounded once, the product compared in float64).
VERIFY_GGUF_REL_TOL_F32 = 1e-5
VERIFY_MAX_WORKERS = 2           # modules verified in parallel threads (GRADIENCE_VERIFY_WORKERS overrides)

# --- intruder dimensions (issue 23) -----------------------------------------------------------------------------
# Shuttleworth et al. 2025 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", NeurIPS) and PEFT's
# reduce_intruder_dimension (peft/tuners/lora/intruders.py): among the top-k left singular vectors of W + ΔW, one
# whose best |cos| against every left singular vector of W is below ε is an intruder; k = 10, ε = 0.5 in both.
INTRUDER_TOP_K = 10
INTRUDER_EPS = 0.5
INTRUDER_MAX_K = 256                 # --intruder-k above this is refused (the Krylov basis grows with k)
# PEFT's default mitigation_lambda (the intruder components of W + ΔW are scaled by λ; Fig. 8 of the paper).
INTRUDER_LAMBDA_DEFAULT = 0.75
# Top-k of W + s·B·A by block Krylov: stop when every ‖M v_i − σ_i u_i‖ ≤ RTOL·σ₁. By Wedin's theorem the angle of
# u_i is then within RTOL·σ₁/gap of the exact one; float32 products of W are accurate to ~1e-6·σ₁ (7B widths).
INTRUDER_RESIDUAL_RTOL = 1e-4
INTRUDER_BLOCK_EXTRA = 10            # Krylov block = k + this (oversampling, Halko et al. 2011 §4.2)
INTRUDER_MAX_BLOCKS = 40             # Krylov blocks at most (then the Ritz vectors are reported unconverged)
# Base side: a partial SVD of W with this many vectors first (×4 each time the bound cannot decide); past
# INTRUDER_DENSE_FRACTION of min(m, n) the dense SVD of W (PEFT's own computation) is cheaper than Krylov.
INTRUDER_BASE_P0 = 32
INTRUDER_DENSE_FRACTION = 0.25
# A |cos| within this of ε is not decided from the partial SVD (its vectors are accurate to ~RTOL·σ₁/gap).
INTRUDER_DECIDE_MARGIN = 1e-3
# Base partial spectra cache: at most this many vectors per tensor and this many bytes in all (oldest dropped).
INTRUDER_CACHE_MAX_VECTORS = 128
INTRUDER_CACHE_MAX_BYTES = 2 * 1024**3
