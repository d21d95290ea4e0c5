"""graphopt.optimize(model) with no example inputs: built inputs, use_cache, dynamic axes, causal masks."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import model_inputs
from graphopt.capture import CaptureError
from graphopt.errors import BadInput
from graphopt.report_markdown import report_to_markdown

transformers = pytest.importorskip("transformers")

SDPA = torch.ops.aten.scaled_dot_product_attention.default
VOCAB = 256
LAYERS = 2
_DECODER = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
CONFIGS = {
    "gpt2": dict(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
    "llama": _DECODER,  # grouped-query: 2 kv heads for 4 heads
    "qwen2": _DECODER,
    "mistral": dict(_DECODER, sliding_window=None),  # a window is proved only against a symbolic range
}
SIZES = [(1, 7), (3, 20), (4, 33)]


def causal_lm(model_type: str, attn: str | None = None, **overrides) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **dict(CONFIGS[model_type], **overrides))
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn} if attn else {}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def sdpa_nodes(result) -> list[torch.fx.Node]:
    return [n for n in result.module.graph.nodes if n.op == "call_function" and n.target == SDPA]


def is_causal_without_mask(node: torch.fx.Node) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return mask is None and causal is True


def ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed + batch * 100 + seq))


@pytest.mark.parametrize("attn", [None, "eager"], ids=["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_optimize_without_inputs(model_type, attn):
    model = causal_lm(model_type, attn)
    assert model.config.use_cache is True
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = graphopt.optimize(model)
    with torch.no_grad():
        for batch, seq in SIZES:
            x = ids(batch, seq)
            assert rel_l2(result(x).logits, model(x).logits) <= 1e-5, (batch, seq)
    nodes = sdpa_nodes(result)
    assert len(nodes) == LAYERS and all(is_causal_without_mask(n) for n in nodes), [n.args[3:] for n in nodes]
    # the user's model and config are untouched
    assert model.config.use_cache is True and "forward" not in vars(model)
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert result.example_args[0].shape == (model_inputs.EXAMPLE_BATCH, model_inputs.EXAMPLE_SEQ)


def test_dynamic_false_gives_a_static_graph():
    model = causal_lm("llama")
    result = graphopt.optimize(model, dynamic=False, verify=False)
    shapes = [n.meta["val"].shape for n in result.module.graph.nodes if n.op == "placeholder"]
    assert shapes and all(isinstance(d, int) for s in shapes for d in s)
    with torch.no_grad():
        x = ids(2, 16)
        assert rel_l2(result(x).logits, model(x).logits) <= 1e-5
        with pytest.raises(Exception):
            result(ids(3, 20))


def test_a_narrowed_range_is_honoured():
    model = causal_lm("llama")
    result = graphopt.optimize(model, dynamic={"seq": (1, 24)}, verify=False)
    with torch.no_grad():
        x = ids(2, 20)
        assert rel_l2(result(x).logits, model(x).logits) <= 1e-5
        with pytest.raises(Exception):
            result(ids(2, 33))  # above the seq range
        with pytest.raises(Exception):
            result(ids(3, 20))  # batch is static


def test_dynamic_ranges_parse():
    model = causal_lm("gpt2")
    assert model_inputs.dynamic_ranges(None, model, built=True) == {"batch": (1, model_inputs.MAX_BATCH),
                                                                    "seq": (1, 1024)}
    assert model_inputs.dynamic_ranges(None, model, built=False) == {}
    assert model_inputs.dynamic_ranges("", model, built=True) == {}
    assert model_inputs.dynamic_ranges(["batch"], model, built=True) == {"batch": (1, model_inputs.MAX_BATCH)}
    assert model_inputs.dynamic_ranges({"seq": (4, 64)}, model, built=True) == {"seq": (4, 64)}
    with pytest.raises(ValueError, match="unknown dynamic axis"):
        model_inputs.dynamic_ranges("time", model, built=True)
    with pytest.raises(BadInput, match="min, max"):
        model_inputs.dynamic_ranges({"seq": 5}, model, built=True)


def test_a_model_that_is_not_transformers_needs_inputs():
    with pytest.raises(BadInput) as info:
        graphopt.optimize(torch.nn.Linear(4, 4))
    assert "example inputs" in str(info.value) and "\n" not in str(info.value)


def test_inputs_follow_the_task():
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128))
    args, kwargs = model_inputs.built_inputs(bert)
    assert model_inputs.task_of(bert) == "encoder" and set(kwargs) == {"attention_mask"}
    assert int(args[0].max()) < VOCAB
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4))
    args, kwargs = model_inputs.built_inputs(t5)
    assert model_inputs.task_of(t5) == "seq2seq" and set(kwargs) == {"attention_mask", "decoder_input_ids"}
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_channels=3))
    args, kwargs = model_inputs.built_inputs(vit)
    assert model_inputs.task_of(vit) == "image" and args[0].shape == (2, 3, 32, 32) and not kwargs
    assert model_inputs.built_inputs(bert)[0][0].tolist() == model_inputs.built_inputs(bert)[0][0].tolist()


def _tiny_speech_and_vision_models() -> dict[str, torch.nn.Module]:
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    heads = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    return {
        "whisper": transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            **heads, num_mel_bins=16, max_source_positions=32, max_target_positions=32, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
        "wav2vec2": transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
            **small, vocab_size=VOCAB, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(small, vocab_size=VOCAB), vision_config=dict(small, image_size=32, patch_size=8))),
    }


@pytest.mark.parametrize("name, expected", [
    ("whisper", {"input_features": (2, 16, 64), "decoder_input_ids": (2, 16)}),
    ("wav2vec2", {"input_values": (2, 10 * 16 + 13)}),  # strides 5 x 2 per frame, plus the kernels
    ("clip", {"input_ids": (2, 16), "attention_mask": (2, 16), "pixel_values": (2, 3, 32, 32)}),
])
def test_speech_and_text_image_models_get_their_inputs_and_optimize(name, expected):
    model = _tiny_speech_and_vision_models()[name].eval()
    args, kwargs = model_inputs.built_inputs(model)
    shapes = {k: tuple(v.shape) for k, v in kwargs.items()} | ({"input_ids": tuple(args[0].shape)} if args else {})
    assert shapes == expected
    assert all(int(v.max()) < VOCAB for k, v in kwargs.items() if k.endswith("input_ids"))
    result = graphopt.optimize(model)
    assert result.report.final_numerics.ok, result.report.final_numerics.reason
    bigger = [torch.cat([a, a[:1]]) for a in result.captured.args]  # a batch of 3 runs, as the original
    more = {k: torch.cat([v, v[:1]]) for k, v in result.captured.kwargs.items()}
    with torch.no_grad():
        got, want = result.module(*bigger, **more), model(*bigger, **more)
    pairs = zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want))
    assert all(rel_l2(g, w) <= 1e-5 for g, w in pairs if isinstance(w, torch.Tensor) and w.is_floating_point())


def test_a_model_whose_main_input_graphopt_does_not_build_is_refused_in_one_line():
    model = _tiny_speech_and_vision_models()["wav2vec2"]
    model.main_input_name = "input_embeds_of_some_kind"
    with pytest.raises(BadInput, match="main input is 'input_embeds_of_some_kind'") as info:
        graphopt.optimize(model)
    assert "\n" not in str(info.value)


def test_an_encoder_without_inputs_runs_at_other_sizes():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)).eval()
    result = graphopt.optimize(bert)
    with torch.no_grad():
        x = ids(3, 20)
        mask = torch.ones_like(x)
        mask[0, 15:] = 0
        ref = bert(x, attention_mask=mask).last_hidden_state
        assert rel_l2(result(x, attention_mask=mask).last_hidden_state, ref) <= 1e-5


@pytest.mark.parametrize("attn", [None, "eager"], ids=["sdpa", "eager"])
def test_a_padding_mask_keeps_the_explicit_mask_with_the_reason(attn):
    model = causal_lm("llama", attn)
    x = ids(2, 16)
    mask = torch.ones_like(x)
    result = graphopt.optimize(model, (x,), {"attention_mask": mask}, dynamic="batch,seq")
    nodes = sdpa_nodes(result)
    assert nodes and not any(is_causal_without_mask(n) for n in nodes)
    reasons = [d.reason for d in result.report.record("fuse_attention").declined]
    assert len(reasons) == LAYERS and all("attention_mask" in r and "is_causal" in r for r in reasons), reasons
    with torch.no_grad():
        y = ids(3, 20)
        pad = torch.ones_like(y)
        pad[1, :5] = 0
        assert rel_l2(result(y, attention_mask=pad).logits, model(y, attention_mask=pad).logits) <= 1e-5


def test_a_sliding_window_shorter_than_the_range_is_not_causal():
    model = causal_lm("mistral", sliding_window=8)
    result = graphopt.optimize(model)
    assert not any(is_causal_without_mask(n) for n in sdpa_nodes(result))
    reasons = [d.reason for d in result.report.record("fuse_attention").declined]
    assert reasons and all("sliding window" in r for r in reasons), reasons
    with torch.no_grad():
        x = ids(3, 20)  # longer than the window: the window masks
        assert rel_l2(result(x).logits, model(x).logits) <= 1e-5


class _ArangeMaskAttention(torch.nn.Module):
    """Attention whose mask is built from the sequence length: keep kv <= q + offset."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[-2])
        keep = pos[None, :] <= pos[:, None] + self.offset
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("offset", [0, 1])
def test_an_arange_mask_is_causal_only_when_exactly_kv_le_q(offset):
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    seq = torch.export.Dim("seq", min=2, max=64)
    shapes = ({2: seq}, {2: seq}, {2: seq})
    model = _ArangeMaskAttention(offset)
    result = graphopt.optimize(model, (q, k, v), dynamic_shapes=shapes)
    nodes = sdpa_nodes(result)
    assert len(nodes) == 1 and is_causal_without_mask(nodes[0]) == (offset == 0)
    q, k, v = (torch.randn(2, 4, 23, 8) for _ in range(3))
    assert rel_l2(result(q, k, v), model(q, k, v)) <= 1e-5


def test_capture_of_a_cache_output_says_so():
    model = causal_lm("llama")
    with pytest.raises(CaptureError) as info:
        graphopt.capture(model, (ids(2, 16),))
    assert "KV cache" in info.value.hint and "use_cache=False" in info.value.hint


def test_an_image_model_gets_a_dynamic_batch():
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3)).eval()
    result = graphopt.optimize(vit)
    with torch.no_grad():
        pixels = torch.randn(5, 3, 32, 32)
        assert rel_l2(result(pixels).logits, vit(pixels).logits) <= 1e-5


def test_a_model_that_fixes_its_sequence_length_gets_a_static_seq_with_a_note():
    # Mamba's scan specializes the sequence length: the default dynamic seq cannot hold, the batch can
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=VOCAB, state_size=4)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    with pytest.raises(CaptureError, match="Constraints violated") as info:  # what the user asking for seq gets
        graphopt.optimize(model, dynamic="batch,seq")
    assert info.value.hint.startswith("the model does not run at every size of the dynamic axis seq")
    result = graphopt.optimize(model)
    assert len(result.report.capture_notes) == 1
    assert result.report.capture_notes[0].startswith("seq static: the model does not run at every seq")
    assert "capture note" in report_to_markdown(result.report)
    seq = result.captured.args[0].shape[1]
    for batch in (1, 3):  # the batch stays dynamic
        x = ids(batch, seq)
        with torch.no_grad():
            assert rel_l2(result.module(x).logits, model(x).logits) <= 1e-5


def test_a_model_that_excludes_one_length_keeps_seq_dynamic_with_a_note():
    # GPT-Neo's local attention guards seq != its max positions: the default range is narrowed, seq stays dynamic
    config = transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=VOCAB, window_size=8,
                                       attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.GPTNeoForCausalLM(config).eval()
    result = graphopt.optimize(model)
    assert [n.startswith("dynamic batch, seq narrowed") for n in result.report.capture_notes] == [True]
    for batch, seq in SIZES:
        x = ids(batch, seq)
        with torch.no_grad():
            assert rel_l2(result.module(x).logits, model(x).logits) <= 1e-5
