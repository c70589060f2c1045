"""Tiny third-party architectures built from configs (no download), for tests/test_architectures.py.

Each :class:`Arch` builds a transformers model (or a small module of our own around an op
without a double backward) in float64 with a few hundred to a few thousand parameters, and
draws inputs for a few-shot task: ``batch(n) -> (inputs, targets)``. ``loss(out, targets)``
reduces the model's output to a scalar. ``head`` is a filter for the classifier (ANIL-style
``filter=``). ``train`` says whether the model runs in train mode (BatchNorm statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Callable[[int, torch.Generator], Tuple[Dict[str, Tensor], Tensor]]

VOCAB = 11
CLASSES = 3


@dataclasses.dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    batch: Batch
    loss: Callable[[Any, Tensor], Tensor]
    head: str
    train: bool = False


def _ce(out: Any, y: Tensor) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mse(out: Any, y: Tensor) -> Tensor:
    return (out - y).pow(2).mean()


def _image(size: int, channels: int = 3) -> Batch:
    def batch(n: int, gen: torch.Generator) -> Tuple[Dict[str, Tensor], Tensor]:
        x = torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)
        return {"pixel_values": x}, torch.randint(0, CLASSES, (n,), generator=gen)

    return batch


def _tokens(length: int, classify: bool = False) -> Batch:
    def batch(n: int, gen: torch.Generator) -> Tuple[Dict[str, Tensor], Tensor]:
        ids = torch.randint(1, VOCAB, (n, length), generator=gen)
        if classify:
            return {"input_ids": ids}, torch.randint(0, CLASSES, (n,), generator=gen)
        return {"input_ids": ids[:, :-1]}, ids[:, 1:]

    return batch


def _seq2seq(length: int) -> Batch:
    def batch(n: int, gen: torch.Generator) -> Tuple[Dict[str, Tensor], Tensor]:
        src = torch.randint(1, VOCAB, (n, length), generator=gen)
        tgt = torch.randint(1, VOCAB, (n, length), generator=gen)
        return {"input_ids": src, "decoder_input_ids": tgt[:, :-1]}, tgt[:, 1:]

    return batch


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, cls_name)(cfg).double()

    return build


_VISION = dict(num_labels=CLASSES)
_TEXT = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def transformers_archs() -> List[Arch]:
    """The transformers architectures, each from a tiny config."""
    return [
        Arch(
            "resnet",
            _hf("ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=4,
                hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic", **_VISION),
            _image(16), _ce, "classifier.*", train=True,
        ),
        Arch(
            "convnext",
            _hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3, num_stages=2,
                hidden_sizes=[4, 8], depths=[1, 1], patch_size=2, **_VISION),
            _image(8), _ce, "classifier.*",
        ),
        Arch(
            "mobilenet_v2",
            _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", num_channels=3, image_size=16,
                depth_multiplier=0.1, min_depth=4, **_VISION),
            _image(16), _ce, "classifier.*",
        ),
        Arch(
            "mobilenet_v1",
            _hf("MobileNetV1ForImageClassification", "MobileNetV1Config", num_channels=3, image_size=16,
                depth_multiplier=0.1, min_depth=4, **_VISION),
            _image(16), _ce, "classifier.*",
        ),
        Arch(
            "vit",
            _hf("ViTForImageClassification", "ViTConfig", image_size=8, patch_size=4, num_channels=3,
                hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, **_VISION),
            _image(8), _ce, "classifier.*",
        ),
        Arch(
            "t5",
            _hf("T5ForConditionalGeneration", "T5Config", d_model=8, d_kv=4, d_ff=8, num_layers=1,
                num_decoder_layers=1, num_heads=2, decoder_start_token_id=0, **_TEXT),
            _seq2seq(5), _ce, "lm_head.*",
        ),
        Arch(
            "bart",
            _hf("BartForConditionalGeneration", "BartConfig", d_model=8, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
                max_position_embeddings=16, **_TEXT),
            _seq2seq(5), _ce, "lm_head.*",
        ),
        Arch(
            "llama_gqa_rope",
            _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, **_TEXT),
            _tokens(6), _ce, "lm_head.*",
        ),
        Arch(
            "qwen2",
            _hf("Qwen2ForCausalLM", "Qwen2Config", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, **_TEXT),
            _tokens(6), _ce, "lm_head.*",
        ),
        Arch(
            "gpt2",
            _hf("GPT2LMHeadModel", "GPT2Config", n_embd=8, n_layer=1, n_head=2, n_positions=16, **_TEXT),
            _tokens(6), _ce, "lm_head.*",
        ),
        Arch(
            "bert",
            _hf("BertForSequenceClassification", "BertConfig", hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=8, max_position_embeddings=16, **_TEXT,
                **_VISION),
            _tokens(6, classify=True), _ce, "classifier.*",
        ),
        Arch(
            "mistral",
            _hf("MistralForCausalLM", "MistralConfig", hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                max_position_embeddings=16, sliding_window=4, **_TEXT),
            _tokens(6), _ce, "lm_head.*",
        ),
    ]


class _Gated(nn.Module):
    """A tiny net around one op that has no double backward."""

    def __init__(self, op: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.op = op
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.op(self.body(x)))


def _vector(n: int, gen: torch.Generator) -> Tuple[Dict[str, Tensor], Tensor]:
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return {"x": x}, torch.randn(n, 1, generator=gen, dtype=torch.float64)


def _cdist(h: Tensor) -> Tensor:
    return torch.cdist(h, torch.eye(6, dtype=h.dtype))  # distances to 6 fixed points


#: name -> the op it wraps, and the aten op the error names.
NO_DOUBLE_BACKWARD_NETS: Dict[str, Tuple[Callable[[], nn.Module], str]] = {
    "hardsigmoid": (lambda: _Gated(nn.Hardsigmoid()).double(), "aten::hardsigmoid_backward"),
    "cdist": (lambda: _Gated(_cdist).double(), "aten::_cdist_backward"),
}
