"""Write a tiny HF Llama as a llama.cpp base GGUF with llama.cpp's own converter classes.

Run as a script: ``python llama_cpp_base.py LLAMA_CPP_DIR HF_MODEL_DIR OUT.gguf``. The tiny model has no tokenizer,
so a byte-style vocabulary of the model's size is written instead (the logits test feeds token ids directly);
everything else (tensor names, the q/k permutation, hyper-parameters) is the converter's.
"""

import sys
from pathlib import Path


def main(llama_cpp: Path, model_dir: Path, out: Path) -> None:
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    import gguf
    from conversion import ModelBase, get_model_class

    hparams = ModelBase.load_hparams(model_dir, False)
    base_cls = get_model_class(hparams["architectures"][0])

    class NoTokenizer(base_cls):  # type: ignore[misc, valid-type]
        model_arch = base_cls.model_arch

        def set_vocab(self) -> None:
            writer, n = self.gguf_writer, hparams["vocab_size"]
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(3, n)])
            writer.add_token_scores([0.0] * n)
            writer.add_token_types([2, 3, 3] + [6] * (n - 3))
            writer.add_unk_token_id(0)
            writer.add_bos_token_id(1)
            writer.add_eos_token_id(2)

    NoTokenizer(model_dir, gguf.LlamaFileType.ALL_F32, out, eager=True, hparams=hparams).write()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
