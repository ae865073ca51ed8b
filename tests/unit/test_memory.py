"""Peak memory of the chunked losses at L = 8192 stays far below one fp32 [L, L] tensor (256 MiB)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

L_LL_MIB = 8192 * 8192 * 4 / 2**20  # 256 MiB

SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from train import ops
    torch.manual_seed(0)
    L, H, G, D, DI, K = 8192, 2, 2, 16, 16, 256
    kind = "{kind}"
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    qi = torch.randn(1, L, G, DI, requires_grad=True); ki = torch.randn(1, L, DI, requires_grad=True)
    wi = torch.randn(1, L, G, requires_grad=True)
    q = torch.randn(1, L, H, D, requires_grad=True); kv = torch.randn(1, L, D, requires_grad=True)
    ka = torch.randn(1, L, H, D)
    idx = ops.indexer_topk(qi.detach()[:, :64], ki.detach()[:, :64], wi.detach()[:, :64], K)  # warm the code path
    base = rss()
    if kind == "warmup_kl":
        kl, recall = ops.dense_indexer_kl(qi, ki, wi, q.detach(), ka, 0.1, K)
        kl.sum().backward()
    elif kind == "sparse_layer":
        idx = ops.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
        out, p, _ = ops.sparse_mla(q, kv, idx, 0.1, 8)
        kl = ops.sparse_indexer_kl(qi, ki, wi, idx, p)
        (out.sum() + kl.sum()).backward()
    print(json.dumps({{"peak_delta_mib": rss() - base}}))
""")


@pytest.mark.parametrize("kind", ["warmup_kl", "sparse_layer"])
def test_peak_memory_far_below_one_LxL_tensor(kind):
    # A fixed mmap threshold makes glibc return every large tensor's memory on free, so peak RSS tracks the
    # peak of live tensors rather than allocator fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(kind=kind)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    delta = json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"]
    print(f"{kind}: peak delta {delta:.0f} MiB vs {L_LL_MIB:.0f} MiB for one [L, L] fp32 tensor")
    assert delta < 0.5 * L_LL_MIB
