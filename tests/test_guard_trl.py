"""GradienceCallback (with the Guard on) inside TRL's SFTTrainer: a tiny Llama built from a config, LoRA via
SFTTrainer's own ``peft_config``, text data tokenized by TRL. The log must hold run_start, train_step, eval and
run_end with the Trainer's own numbers, and the guard must roll back an injected NaN there too."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig  # noqa: E402
from gradience.telemetry.reader import read_events  # noqa: E402
from gradience.toy.dataset import load_builtin  # noqa: E402
from gradience.toy.model import build_word_tokenizer  # noqa: E402


@pytest.mark.slow
def test_sft_trainer_run_log_and_guard(tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    data = load_builtin()
    tok = build_word_tokenizer(data.train_texts)
    tok.eos_token = "[SEP]"  # the word tokenizer has no EOS; SFTTrainer appends one to every text
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=tok.pad_token_id))

    class NanAt(TrainerCallback):
        on = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.on = state.global_step + 1 == 4

    nan_at = NanAt()
    cb = GradienceCallback(GradienceCallbackConfig(dataset_name="toy-text", guard=True, guard_snapshot_every=2))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, logging_steps=2,
                     eval_strategy="steps", eval_steps=3, report_to="none", use_cpu=True, disable_tqdm=True,
                     save_strategy="no", max_length=32, learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(
                                 {"text": data.train_texts[:64]}),
                             eval_dataset=datasets.Dataset.from_dict({"text": data.test_texts[:16]}),
                             processing_class=tok, callbacks=[cb, nan_at],
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    embed = trainer.model.get_input_embeddings()
    embed.register_forward_hook(lambda mod, inp, out: out * float("nan") if nan_at.on and mod.training else None)
    trainer.train()

    records = [rec.data for rec in read_events(tmp_path / "run.jsonl")]
    events = [r["event"] for r in records]
    assert events[0] == "run_start" and events[-1] == "run_end" and records[-1]["status"] == "ok"
    assert records[0]["config"]["dataset_name"] == "toy-text"
    assert records[0]["config"]["lora"]["r"] == 4
    assert records[0]["meta"]["guard"]["loss_source"] == "step"
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h]
    steps = [r for r in records if r["event"] == "train_step"]
    assert [r["step"] for r in steps] == [h["step"] for h in logged] == [2, 4, 6]
    for rec, h in zip(steps, logged, strict=True):
        assert rec["loss"] == pytest.approx(h["loss"]) and rec["lr"] == pytest.approx(h["learning_rate"])
    evals = [r for r in records if r["event"] == "eval"]
    assert [(r["step"], r["split"]) for r in evals] == [(3, "test"), (6, "test")]
    hist_evals = [h for h in history if "eval_loss" in h]
    for rec, h in zip(evals, hist_evals, strict=True):
        assert rec["metrics"]["loss"] == pytest.approx(h["eval_loss"])
        assert rec["metrics"]["ppl"] == pytest.approx(math.exp(h["eval_loss"]))
    audit = [r["metrics"] for r in records if r["event"] == "metrics" and r["kind"] == "lora_audit"]
    assert len(audit) == 1 and audit[0]["n_layers"] == 4  # 2 layers x q_proj, v_proj
    guard = [r["metrics"] for r in records if r["event"] == "metrics" and r["kind"] == "guard"]
    assert [(g["trigger"], g["step"], g["restored_step"]) for g in guard] == [("nonfinite_grad_norm", 4, 2)]
    assert all(math.isfinite(r["loss"]) for r in steps[2:])
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
