"""EdgeTensorProduct gives e3nn's uvu TensorProduct, and model files of the e3nn block still load."""

import pytest
import torch
from e3nn import o3

from mfmlip.model.blocks import Interaction, hidden_irreps
from mfmlip.model.tensor_product import EdgeTensorProduct


def e3nn_and_ours(lmax_in: int, lmax_sh: int, mul: int = 4):
    """The block's paths (every output of ``ir_in x ir_sh`` that is one of the inputs' irreps) both ways."""
    irreps_in, irreps_sh = hidden_irreps(mul, lmax_in), o3.Irreps.spherical_harmonics(lmax_sh)
    outs = [ir for _, ir in irreps_in]
    paths = [(i, s, outs.index(ir)) for i, (_, a) in enumerate(irreps_in) for s, (_, b) in enumerate(irreps_sh)
             for ir in a * b if ir in outs]
    out = o3.Irreps([(mul, ir) for ir in outs])
    theirs = o3.TensorProduct(irreps_in, irreps_sh, out, [(i, s, o, "uvu", True) for i, s, o in paths],
                              shared_weights=False, internal_weights=False)
    return theirs, EdgeTensorProduct(irreps_in, irreps_sh, out, paths), irreps_sh


@pytest.mark.parametrize("lmax_in,lmax_sh", [(1, 1), (1, 2), (2, 2), (3, 2)])
def test_values_and_double_derivatives_equal_e3nns(lmax_in, lmax_sh):
    torch.set_default_dtype(torch.float64)
    try:
        theirs, ours, irreps_sh = e3nn_and_ours(lmax_in, lmax_sh)
        torch.manual_seed(0)
        x, vec = torch.randn(7, theirs.irreps_in1.dim), torch.randn(7, 3, requires_grad=True)
        w = torch.randn(7, theirs.weight_numel, requires_grad=True)
        assert ours.weight_numel == theirs.weight_numel

        def run(tp, to_ours):
            sh = o3.spherical_harmonics(irreps_sh, vec, True)
            out = ours.to_irreps(tp(ours.to_channels(x), sh, w)) if to_ours else tp(x, sh, w)
            d_vec, = torch.autograd.grad(out.square().sum(), vec, create_graph=True)  # as forces are
            d_w, = torch.autograd.grad(d_vec.square().sum(), w)                      # as the force loss is
            return out, d_vec, d_w

        for a, b in zip(run(theirs, False), run(ours, True)):
            assert a.abs().max() > 1e-3
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_path_that_breaks_parity_is_refused():
    irreps = o3.Irreps("2x0e + 2x1o")
    with pytest.raises(ValueError, match="path 0: 1o is not in 0e x 0e"):
        EdgeTensorProduct(irreps, o3.Irreps("0e"), irreps, [(0, 0, 1)])


def test_a_state_dict_with_e3nns_tensor_product_buffers_loads():
    block = Interaction(hidden_irreps(4, 1), hidden_irreps(4, 1), o3.Irreps.spherical_harmonics(1), 8, 16, 10.0)
    state = block.state_dict()
    assert not any(k.startswith("tp.") for k in state)
    old = {**state, "tp.weight": torch.zeros(0), "tp.output_mask": torch.ones(16)}  # as format 3 files hold
    block.load_state_dict(old)  # strict: nothing missing, nothing left over
    with pytest.raises(RuntimeError, match="tp.something"):
        block.load_state_dict({**state, "tp.something": torch.zeros(1)})
