"""LoRA: low-rank adapters trained on top of a frozen model (Hu et al., 2021).

    lora = attach_lora(model, LoraSpec(rank=8))   # model.lora holds the only trainable parameters
    ...train...
    merge_lora(model)                             # W += (alpha / rank) * B @ A; a plain GPT again

The adapters add their output through forward hooks on the chosen nn.Linear layers, so the model's own code and
parameter names stay untouched (its checkpoints and exports are unchanged) and the one training loop trains them
like any other parameters. A LoRA run saves only the adapters: `model.lora.*`, a few percent of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from homellm.config import LORA_TARGETS
from homellm.errors import HomeLLMError
from homellm.model import GPT


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing the rank keeps its size
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


class LoRA(nn.Module):
    """A (rank, in) and B (out, rank) per target layer; B starts at zero so training starts from the base model."""

    def __init__(self, model: GPT, spec: LoraSpec, new: bool = True):
        super().__init__()
        if spec.rank <= 0:
            raise HomeLLMError(f"--lora-rank {spec.rank}: give a positive rank (e.g. 8)")
        self.scale = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.layers: dict[str, nn.Linear] = {}
        names: dict[int, list[str]] = {}
        for pname, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(pname)
        targets = [t.strip() for item in spec.targets for t in item.split(",") if t.strip()]  # "q_proj,v_proj" too
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
                if len(shared := names[id(module.weight)]) > 1:
                    # Merged, the update would change every user of the weight, not only the layer it trained in.
                    # Loading merges too, so a run made before this check is refused rather than run wrongly.
                    raise HomeLLMError(f"--lora-targets {name.split('.')[-1]}: {name} shares its weight with "
                                       f"{', '.join(n for n in shared if n != name + '.weight')} (tied embeddings), "
                                       "so merging its adapter would change both: leave it out of --lora-targets")
                if new and spec.rank > (width := min(module.in_features, module.out_features)):
                    # A rank above the layer's width adds nothing a full update lacks, at more cost than one.
                    raise HomeLLMError(f"--lora-rank {spec.rank} is above {name}'s width ({module.in_features} x "
                                       f"{module.out_features}): use at most {width} (8 or 16 are usual), or "
                                       "fine-tune all weights")
                key = name.replace(".", "_")  # ParameterDict keys cannot hold dots
                A = torch.empty(spec.rank, module.in_features, device=module.weight.device)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear initialises its weight
                self.A[key] = nn.Parameter(A)
                self.B[key] = nn.Parameter(torch.zeros(module.out_features, spec.rank, device=module.weight.device))
                self.layers[key] = module
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        # A typo (v_prj) was left out unsaid. The default list names both families' layers (gate_proj is llama's);
        # named by the user, a layer the model lacks (gate_proj in a GPT-2) is said, as config.json would list it.
        defaults = LORA_TARGETS if sorted(targets) == sorted(LORA_TARGETS) else ()
        if new and (unknown := [t for t in targets if t not in linear and t not in defaults]):
            raise HomeLLMError(f"--lora-targets {unknown[0]} names no linear layer of the model: use some of "
                               f"{', '.join(linear)}")
        if not self.layers:
            raise HomeLLMError(f"--lora-targets {','.join(spec.targets)} match no linear layer of the model: use "
                               "names such as q_proj, v_proj, up_proj, down_proj")
        self._hooks = [m.register_forward_hook(self._hook(k)) for k, m in self.layers.items()]

    def _hook(self, key: str):
        def add_update(module: nn.Linear, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = self.dropout(inputs[0]) if self.dropout.p else inputs[0]  # dropout(p=0) still copies in training
            update = F.linear(F.linear(x, self.A[key].to(x.dtype)), self.B[key].to(x.dtype))
            # In place: autograd keeps no copy of a linear's output, and a new (batch, T, out) tensor per adapted
            # layer raised the forward's peak memory on a 124M model from 1.5 to 1.9 GB (measured).
            return out.add_(update, alpha=self.scale)
        return add_update

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def attach_lora(model: GPT, spec: LoraSpec, new: bool = True) -> LoRA:
    """Freeze the model and add adapters as `model.lora`, its only trainable parameters. `new` is False for adapters
    a saved run already trained: a rank check for new ones must not lock out runs that were allowed then."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.lora = LoRA(model, spec, new)
    return model.lora


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold the adapters into the weights they adapt and drop them: the same function, no extra cost per token."""
    lora: LoRA = model.lora
    for key, module in lora.layers.items():
        module.weight += (lora.B[key] @ lora.A[key]).to(module.weight.dtype) * lora.scale
    lora.remove()
    del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
