"""The README's "inside your own GRPO loop" snippet runs as written against a toy policy."""
import re
from pathlib import Path
from types import SimpleNamespace

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "from apex_fast.balance import APEX" in b]
    return code


class ToyPolicy(torch.nn.Module):
    """A Gaussian policy over 4-d 'images'; log_prob of the sampled actions."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(4))

    def log_prob(self, batch):
        return torch.distributions.Normal(self.mu, 1.0).log_prob(batch.images).mean(1)


def test_readme_grpo_snippet_runs_and_logs_priorities():
    torch.manual_seed(0)
    policy = ToyPolicy()
    logged = []

    def sample(policy, prompts, group_size):
        n = len(prompts) * group_size
        with torch.no_grad():
            x = policy.mu + torch.randn(n, 4)
            b = SimpleNamespace(images=x, prompts=[p for p in prompts for _ in range(group_size)],
                                prompt_idx=torch.arange(len(prompts)).repeat_interleave(group_size))
            b.logp = policy.log_prob(b)
        return b

    # four objectives of very different scales; the first one is sparse, like OCR
    scorers = [lambda im, p: (im[:, 0] > 1.5).float(), lambda im, p: 0.01 * im[:, 1],
               lambda im, p: im[:, 2], lambda im, p: -im[:, 3].abs()]
    ns = dict(epochs=8, sample=sample, policy=policy, prompts=["a", "b", "c"], G=8, scorers=scorers,
              inner_steps=2, eps_c=0.2, opt=torch.optim.SGD(policy.parameters(), lr=0.1),
              log=lambda stats, epoch: logged.append(stats))
    exec(_snippet(), ns)
    assert len(logged) == 8
    last = logged[-1]
    pri = [last[f"priority/{n}"] for n in ("ocr", "pickscore", "aesthetic", "deqa")]
    assert abs(sum(pri) - 1) < 1e-5 and min(pri) >= 0.05 - 1e-6
    assert all(k in last for k in ("L/ocr", "C/deqa", "N/aesthetic", "hijack_share/ocr"))
    assert isinstance(ns["state"], dict) and ns["state"]
    assert policy.mu.abs().sum() > 0  # the loop trained the policy
