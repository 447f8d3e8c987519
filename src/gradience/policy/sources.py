"""Short citations of the evidence behind Gradience's rules (issue 18: advice must say where it comes from).

Each rule's :class:`~gradience.telemetry.types.Recommendation` carries one of these in ``source`` (JSON) and
``check --verbose`` / ``monitor --verbose`` print it. A citation is "authors, title, year" for a paper, or the
engine file and function for behaviour read from a library's source. ``HEURISTIC`` marks a sanity rule that no
paper states a number for (a negative weight decay, a dropout of 1): the threshold is a definition, not a result.
"""

from __future__ import annotations

HU_2021 = 'Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021'
DETTMERS_2023 = 'Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023'
BIDERMAN_2024 = 'Biderman et al., "LoRA Learns Less and Forgets Less", 2024'
SCHULMAN_2025 = 'Schulman et al., "LoRA Without Regret", Thinking Machines Lab, 2025'
KALAJDZIEVSKI_2023 = ('Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" '
                      "(rsLoRA), 2023")
GALIM_2024 = 'Galim et al., "Parameter-Efficient Fine-Tuning of State Space Models", 2024 (ICML 2025)'
PEFT_MOE_DOCS = ('PEFT docs, package_reference/lora.md "MoE expert parameters and vLLM" '
                 "(effective_r = max(1, r // num_experts)), 2025")
PEFT_LORA_CONFIG = "PEFT, peft/tuners/lora/config.py LoraConfig (r, lora_alpha default 8, use_rslora)"
HF_TRAINER = "transformers, trainer.py Trainer._inner_training_loop (clip_grad_norm_, logging_nan_inf_filter)"
HF_SCHEDULER = "transformers, optimization.py get_scheduler (linear/cosine decay to 0 at the last step)"
HEURISTIC = "Gradience sanity rule (a definition, not a published threshold)"

LORA_LR = f"{SCHULMAN_2025}; {HU_2021}"
ALL_LINEAR_TARGETS = f"{DETTMERS_2023}; {BIDERMAN_2024}; {SCHULMAN_2025}"
