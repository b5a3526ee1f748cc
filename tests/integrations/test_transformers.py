"""GrootL inside transformers' Mamba: the chain reproduces the model, the causal tree is
causal and generates with the cache exactly as by recomputation, the paper mode
recomputes, and the conversion keeps the model's class, weights and keys."""
import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, MambaConfig, MambaForCausalLM, MambaModel  # noqa: E402

from treessm.integrations.transformers import (TRANSFORMERS_RANGE,  # noqa: E402
                                               check_transformers_version, grootl_from_mamba,
                                               set_context_len)
from treessm.nn.grootl import GrootLMixer  # noqa: E402

VOCAB = 50
# the model's own name of its cache argument: cache_params before 5.24, cache from 5.24
CACHE_ARG = ("cache" if "cache" in inspect.signature(MambaForCausalLM.forward).parameters
             else "cache_params")


def tiny_config(**kwargs):
    return MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None, **kwargs)


@pytest.fixture(scope="module")
def mamba():
    torch.manual_seed(0)
    return MambaForCausalLM(tiny_config()).eval()


def converted(model, mode, **options):
    return grootl_from_mamba(copy.deepcopy(model), mode, **options)


def tokens(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0, **kwargs)


def assert_same_generation(cached, recomputed):
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert len(cached.scores) == len(recomputed.scores) == 10
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- conversion
def test_chain_reproduces_the_model(mamba):
    ids = tokens(3, 20)
    with torch.no_grad():
        ref = mamba(ids).logits
        model = converted(mamba, "chain")
        assert type(model) is MambaForCausalLM
        assert all(isinstance(block.mixer, GrootLMixer) for block in model.backbone.layers)
        assert (model(ids).logits - ref).abs().max() <= 1e-4
    backbone = MambaModel(tiny_config())
    with torch.no_grad():
        ref = backbone(ids).last_hidden_state
        grootl_from_mamba(backbone)
        assert (backbone(ids).last_hidden_state - ref).abs().max() <= 1e-4


def test_conversion_keeps_weights_keys_dtype_and_mode_changes(mamba):
    keys = mamba.state_dict()
    model = converted(mamba, "causal", k=3)
    state = model.state_dict()
    assert list(state) == list(keys)
    assert all(torch.equal(state[k], keys[k]) for k in keys)
    # a converted model's weights load into a plain Mamba, and back
    plain = MambaForCausalLM(tiny_config()).eval()
    plain.load_state_dict(state)
    ids = tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(plain, "chain")(ids).logits, mamba(ids).logits,
                                   rtol=0, atol=1e-4)
        # converting again changes the mode and keeps the weights
        grootl_from_mamba(model, "chain")
        assert model.backbone.layers[1].mixer.mode == "chain"
        torch.testing.assert_close(model(ids).logits, mamba(ids).logits, rtol=0, atol=1e-4)
    double = converted(mamba.double(), "causal")
    mamba.float()
    assert double.backbone.layers[0].mixer.A_log.dtype == torch.float64
    assert double.backbone.layers[0].mixer.layer_idx == 0
    assert double.backbone.layers[1].mixer.layer_idx == 1
    assert double.backbone.layers[0].mixer.k == 4


def test_gradients_reach_every_mixer_parameter(mamba):
    model = converted(mamba, "causal", k=2).train()
    ids = tokens(2, 12)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".mixer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- causal mode
@pytest.mark.parametrize("k", [1, 3])
def test_causal_logits_ignore_later_tokens(mamba, k):
    model = converted(mamba, "causal", k=k)
    ids = tokens(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
        for t in (0, 6, 12):
            changed = ids.clone()
            changed[:, t + 1:] = tokens(2, 15 - t, seed=t + 7)
            torch.testing.assert_close(model(changed).logits[:, :t + 1], ref[:, :t + 1],
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, options", [("chain", {}), ("causal", dict(k=1)),
                                           ("causal", dict(k=3)), ("causal", dict(k=8))])
def test_cached_generation_equals_recomputation(mamba, mode, options):
    model = converted(mamba, mode, **options)
    ids = tokens(3, 6)
    cached = generate(model, ids)
    assert_same_generation(cached, generate(model, ids, use_cache=False))
    if mode == "chain":  # and the cache is Mamba's
        assert_same_generation(cached, generate(mamba, ids))


def test_cache_continues_chunks_of_any_length(mamba):
    model = converted(mamba, "causal", k=3)
    ids = tokens(2, 15)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        pieces, start = [], 0
        for stop in (2, 6, 7, 8, 12, 15):  # prefill shorter than k, then chunks and tokens
            out = model(ids[:, start:stop], use_cache=True, **{CACHE_ARG: cache})
            pieces.append(out.logits)
            start = stop
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_mixer_takes_the_cache_under_either_name(mamba):
    model = converted(mamba, "causal", k=2)
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(2, 5, 16)
    outs = []
    for name in ("cache", "cache_params"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = mixer(hidden[:, :4], **{name: cache})
            outs.append(torch.cat([first, mixer(hidden[:, 4:], **{name: cache})], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], mixer(hidden), rtol=1e-5, atol=1e-6)


def test_left_padded_batch_generates_like_each_prompt_alone(mamba):
    model = converted(mamba, "causal", k=3)
    short, long = tokens(1, 4, seed=3), tokens(1, 7, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    for row, prompt in ((0, short), (1, long)):
        alone = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, -8:], alone[0, -8:])


def test_beam_search_reorders_the_causal_cache(mamba):
    model = converted(mamba, "causal", k=3)
    ids = tokens(2, 5)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


# ---------------------------------------------------------------------------- paper mode
def test_paper_mode_recomputes_in_generation(mamba):
    model = converted(mamba, "paper")
    assert model.generation_config.use_cache is False
    ids = tokens(2, 6)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="cannot continue a cached sequence"):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=True)
    set_context_len(model, 4)
    assert all(block.mixer.context_len == 4 for block in model.backbone.layers)
    # converting to a causal mode gives generation its cache back
    grootl_from_mamba(model, "causal")
    assert model.generation_config.use_cache is True


def test_paper_mode_differs_from_the_chain_and_sees_the_future(mamba):
    model = converted(mamba, "paper", tree_scale=1.0)
    ids = tokens(1, 16)
    with torch.no_grad():
        ref = model(ids).logits
        changed = ids.clone()
        changed[:, 10:] = tokens(1, 6, seed=9)
        assert not torch.allclose(model(changed).logits[:, :10], ref[:, :10])
        assert not torch.allclose(ref, mamba(ids).logits)


# ---------------------------------------------------------------------------- PEFT
def test_lora_on_a_converted_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = grootl_from_mamba(MambaForCausalLM(tiny_config()), "causal", k=2)
    # PEFT itself refuses out_proj and conv1d for model_type "mamba"
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=4, target_modules=["in_proj", "x_proj", "dt_proj"], init_lora_weights=False))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = tokens(2, 10)
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in lora.parameters() if p.requires_grad)
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert isinstance(merged.backbone.layers[0].mixer, GrootLMixer)
    out = merged.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs(mamba):
    with pytest.raises(ValueError, match="mode must be one of"):
        converted(mamba, "tree")
    with pytest.raises(ValueError, match="k must be a positive int"):
        converted(mamba, "causal", k=0)
    with pytest.raises(ValueError, match="k is used with mode='causal'"):
        converted(mamba, "chain", k=2)
    with pytest.raises(ValueError, match="MambaForCausalLM or MambaModel"):
        grootl_from_mamba(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="MambaForCausalLM or MambaModel"):
        grootl_from_mamba("mamba")
    with pytest.raises(ValueError, match="no GrootLMixer with mode='paper'"):
        set_context_len(converted(mamba, "chain"), 3)


@pytest.mark.parametrize("version, ok", [("4.46.3", False), ("5.4.0", False), ("5.16.2", False),
                                         ("5.17.0", True), ("5.24.0", True), ("5.99.0.dev0", True),
                                         ("6.0.0", False)])
def test_supported_transformers_range(version, ok):
    assert TRANSFORMERS_RANGE == ((5, 17), (6, 0))
    if ok:
        assert check_transformers_version(version) == version
    else:
        with pytest.raises(ImportError, match=r"transformers>=5\.17,<6"):
            check_transformers_version(version)
    assert check_transformers_version() == transformers.__version__


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.is_available() is False")
@pytest.mark.parametrize("mode", ["chain", "causal"])
def test_cuda_generation_with_the_cache(mamba, mode):
    model = converted(mamba, mode).cuda()
    ids = tokens(3, 6).cuda()
    cached = generate(model, ids)
    assert_same_generation(cached, generate(model, ids, use_cache=False))
    with torch.no_grad():
        on_cpu = converted(mamba, mode)(ids.cpu()).logits
        torch.testing.assert_close(model(ids).logits.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
