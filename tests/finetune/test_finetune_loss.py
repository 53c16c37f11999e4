"""glm.finetune.loss: the official loss and its gradients against the reference goldens, the training positions and
mask, and training through packed INT8/INT4 bases."""

import weakref

import pytest
import torch
from finetune_cases import BASE, GRAD_RTOL, GT, LOSS_TOL, TRAIN, G, random_rows, train_prefix
from glm_testutil import FIXTURES
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import glm
from glm.config import GLMConfig
from glm.finetune import DataError, add_prefix, prefix_parameters, ptuning_loss, training_inputs
from glm.model import GLM
from glm.quant import QuantLinear, quantize_


@pytest.mark.parametrize("case", G["cases"], ids=lambda c: c["prefix"])
def test_loss_and_gradients_match_the_reference(case):
    m = glm.load(BASE, ptuning=TRAIN / case["prefix"])
    assert m.config.prefix_projection is case["prefix_projection"]
    params = prefix_parameters(m)
    loss = ptuning_loss(m, G["input_ids"], G["labels"])
    assert abs(loss.item() - case["loss"]) <= LOSS_TOL
    loss.backward()
    named = dict(m.model.prefix_encoder.named_parameters())
    assert len(named) == len(case["grads"]) == len(params)
    for ck_name, golden_name in case["grads"].items():
        ours, ref = named[ck_name.removeprefix("transformer.prefix_encoder.")].grad, GT[golden_name]
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= GRAD_RTOL * ref.abs().max().item(), ck_name
    # Gradients reach the prefix encoder and nothing else.
    assert all(p.grad is None and not p.requires_grad for n, p in m.model.named_parameters()
               if not n.startswith("prefix_encoder."))
    with torch.no_grad():
        for i, ref in enumerate(case["per_example_loss"]):
            assert abs(ptuning_loss(m, G["input_ids"][i : i + 1], G["labels"][i : i + 1]).item() - ref) <= LOSS_TOL


def test_training_positions_run_on_over_the_pads(chatglm_tiny):
    cfg = chatglm_tiny.config
    ids = torch.tensor([[5, 6, cfg.gmask_token_id, cfg.bos_token_id, 7, cfg.eos_token_id, 3, 3]])
    pos, mask = training_inputs(ids, cfg, prefix=2)
    assert pos[0].tolist() == [[0, 1, 2, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4, 5]]
    assert mask.shape == (1, 1, 8, 10)
    assert mask[0, 0, :, :2].all()  # every token sees the prefix
    assert mask[0, 0, 0, 2:6].tolist() == [True, True, True, False]  # the context is bidirectional up to <sop>
    assert mask[0, 0, 5, 2:].tolist() == [True] * 6 + [False] * 2  # causal from <sop> on


def test_training_positions_take_mask_when_there_is_no_gmask(chatglm_tiny):
    cfg = chatglm_tiny.config
    ids = torch.tensor([[5, cfg.mask_token_id, 6, cfg.bos_token_id, 7, cfg.eos_token_id],
                        [5, 6, cfg.gmask_token_id, cfg.bos_token_id, 7, cfg.eos_token_id]])
    pos, _ = training_inputs(ids, cfg)
    assert pos[:, 0].tolist() == [[0, 1, 2, 1, 1, 1], [0, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("lacks", ["both", "sop", "mask"])
def test_a_row_without_gmask_or_sop_is_a_data_error(chatglm_tiny, lacks):
    cfg = chatglm_tiny.config
    row = {"both": [5, 6, 7], "sop": [5, cfg.gmask_token_id, 7], "mask": [5, cfg.bos_token_id, 7]}[lacks]
    ids = torch.tensor([[5, 6, cfg.gmask_token_id, cfg.bos_token_id, 7], row + [3, 3]])  # the second row is bad
    with pytest.raises(DataError, match=r"^every training row needs \[gMASK\] \(or \[MASK\]\) and <sop>: build rows "
                                        r"with preprocess_rows$"):
        training_inputs(ids, cfg)


# ---------------------------------------------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("fixture", ["glm-tiny-int8", "glm-tiny-int4"])
def test_quantized_base_trains(fixture):
    m = glm.load(FIXTURES / fixture)
    losses = train_prefix(m)
    assert losses[-1] < losses[0] - 3.0, losses
    for mod in m.model.modules():
        if isinstance(mod, QuantLinear):
            assert mod.packed_weight().dtype == torch.int8 and mod.bias.grad is None


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops allocate while active (views and in-place results not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                st = t.untyped_storage()
                if id(st) not in self.live:
                    self.live[id(st)] = st.nbytes()
                    weakref.finalize(st, self.live.pop, id(st), None)
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_training_step_never_holds_the_float_weights(bits):
    # Wide enough that the float32 weights (25 MB) dwarf the activations of a short batch.
    cfg = GLMConfig(**{**GLMConfig.from_name("tiny").to_dict(), "hidden_size": 512, "inner_hidden_size": 2048,
                       "num_layers": 2})
    m = quantize_(GLM(cfg).eval().requires_grad_(False), bits)
    add_prefix(m, 4, seed=0)
    params = prefix_parameters(m)
    float_bytes = sum(4 * q.in_features * q.out_features for q in m.modules() if isinstance(q, QuantLinear))
    ids, labels = random_rows(cfg, (8,), target=6)
    with PeakMemory() as mem:
        ptuning_loss(m, ids, labels).backward()
    assert all(p.grad is not None for p in params)
    # Activations and a 2 MiB slice of dequantized rows or two: far from one float32 copy of the weights.
    assert mem.peak < float_bytes / 2, (mem.peak, float_bytes)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_loss_and_gradients_match_the_reference_on_gpu():
    case = G["cases"][1]  # the MLP prefix: every kind of prefix parameter
    m = glm.load(BASE, ptuning=TRAIN / case["prefix"], device="cuda", dtype="float32")
    prefix_parameters(m)
    loss = ptuning_loss(m, G["input_ids"], G["labels"])
    loss.backward()
    assert abs(loss.item() - case["loss"]) <= LOSS_TOL
    named = dict(m.model.prefix_encoder.named_parameters())
    for ck_name, golden_name in case["grads"].items():
        ours, ref = named[ck_name.removeprefix("transformer.prefix_encoder.")].grad.cpu(), GT[golden_name]
        assert (ours - ref).abs().max().item() <= GRAD_RTOL * ref.abs().max().item(), ck_name


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["glm-tiny-int8", "glm-tiny-int4"])
def test_quantized_fp16_base_trains_on_gpu(fixture):
    # The Triton kernels run the forward; the backward dequantizes a slice of rows at a time.
    m = glm.load(FIXTURES / fixture, device="cuda", dtype="float16")
    losses = train_prefix(m)
    assert m.model.layers[1].attention.dense.forward_path == "triton"
    assert losses[-1] < losses[0] - 3.0, losses
