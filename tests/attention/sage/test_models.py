"""fewer's own models with sage attention in every layer (through ``use_backend``), against exact attention.

The models are randomly initialised here (no trained checkpoint is part of the repo); the trained
end-to-end numbers (LLaMA perplexity, DiT sample PSNR) are left to the model/training issues."""

import pytest
import torch

from fewer.attention import use_backend
from fewer.attention.sage import SageConfig
from fewer.core import cos_sim, rel_l1

TWIN = SageConfig(kernel="torch")


def test_tiny_llama_loss_and_logits_with_sage_everywhere():
    llama = pytest.importorskip("fewer.models.llama")
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(n_kv_heads=2, max_seq_len=128)).to(torch.bfloat16).eval()
    idx = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits, ref_loss = model(idx[:, :-1], idx[:, 1:])
        with use_backend("sage", TWIN):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert not torch.equal(logits, ref_logits)
    assert cos_sim(logits, ref_logits) > 0.999 and rel_l1(logits, ref_logits) < 0.02
    assert abs(float(loss) - float(ref_loss)) < 0.01 * float(ref_loss)


def test_tiny_dit_output_with_sage_everywhere():
    dit = pytest.importorskip("fewer.models.dit")
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(input_size=16, patch_size=2, dim=128, heads=2))
    with torch.no_grad():  # adaLN-Zero starts with zero outputs; perturb so attention reaches the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(2, 1, 16, 16, dtype=torch.bfloat16)
    t = torch.rand(2, dtype=torch.bfloat16)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with use_backend("sage", TWIN):
            out = model(x, t, y)
    assert not torch.equal(out, ref)
    assert cos_sim(out, ref) > 0.999 and rel_l1(out, ref) < 0.02
