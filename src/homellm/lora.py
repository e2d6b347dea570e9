"""LoRA: low-rank adapters trained on top of a frozen model (Hu et al., 2021).

    lora = attach_lora(model, LoraSpec(rank=8))   # model.lora holds the only trainable parameters
    ...train...
    merge_lora(model)                             # W += (alpha / rank) * B @ A; a plain GPT again

The adapters add their output through forward hooks on the chosen nn.Linear layers, so the model's own code and
parameter names stay untouched (its checkpoints and exports are unchanged) and the one training loop trains them
like any other parameters. A LoRA run saves only the adapters: `model.lora.*`, a few percent of the model.

The embedding and head rows of a few tokens (`LoraSpec.tokens`: sft gives the chat tokens) train too, as deltas,
as PEFT's trainable_token_indices does: a base never saw <|im_start|> or <|im_end|> in pretraining (an import
adds them as new rows), and low-rank adapters on the layers between cannot move <|im_end|>'s own row, so whether a
reply ends would rest on a row nothing trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from homellm.config import LORA_TARGETS
from homellm.errors import HomeLLMError
from homellm.model import GPT


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing the rank keeps its size
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    tokens: list[int] = field(default_factory=list)  # ids whose embedding and head rows train too (runs before: none)


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
        self.tokens = list(spec.tokens)
        self.tied = model.lm_head.weight is model.embed_tokens.weight
        self._model = [model]  # not a submodule: the model holds the adapters, not the other way round
        if self.tokens:
            self._train_rows(model)

    def _train_rows(self, model: GPT) -> None:
        vocab, width = model.embed_tokens.weight.shape
        if bad := [t for t in self.tokens if not 0 <= t < vocab]:
            raise HomeLLMError(f"LoRA tokens {bad}: the model has ids 0 to {vocab - 1} only: the tokenizer is not "
                               "the model's")
        device = model.embed_tokens.weight.device
        ids = torch.tensor(self.tokens, device=device)
        slot = torch.zeros(vocab, dtype=torch.long, device=device)  # 0: no delta; k: the (k-1)th row
        slot[ids] = torch.arange(1, len(ids) + 1, device=device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_slot", slot, persistent=False)
        self.embed_rows = nn.Parameter(torch.zeros(len(ids), width, device=device))  # zero: the base model at first
        # A tied head is the embedding: one delta serves both, as merging it into the one weight will.
        self.head_rows = None if self.tied else nn.Parameter(torch.zeros(len(ids), width, device=device))

        def add_rows(module: nn.Embedding, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            return out + F.pad(self.embed_rows, (0, 0, 1, 0)).to(out.dtype)[self.token_slot[inputs[0]]]
        self._hooks.append(model.embed_tokens.register_forward_hook(add_rows))
        # The head's weight itself, not a hook on its output: the loss over a large vocabulary is computed in chunks
        # from the weight (model.chunked_cross_entropy), never holding (batch, T, vocab) logits, and stays so.
        parametrize.register_parametrization(model.lm_head, "weight", _AddRows(self))
        # The rest of the head is frozen: the chunked loss computes the gradient of these rows alone (the whole
        # vocabulary's made a step 1.23x slower where the head is most of the model, against 1.05x: bench/README.md).
        # A buffer of the head's own, so that it moves to the GPU with the model.
        model.lm_head.register_buffer("grad_rows", ids.clone(), persistent=False)

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
        if self.tokens and parametrize.is_parametrized(head := self._model[0].lm_head, "weight"):
            parametrize.remove_parametrizations(head, "weight", leave_parametrized=False)  # the tie, if any, kept
            del head.grad_rows


class _AddRows(nn.Module):
    """The head's weight with the LoRA's rows added to its tokens' rows."""

    def __init__(self, lora: LoRA):
        super().__init__()
        self._lora = [lora]  # not a submodule: the rows are the LoRA's parameters, saved once under its name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        lora = self._lora[0]
        rows = lora.embed_rows if lora.head_rows is None else lora.head_rows
        return weight.index_add(0, lora.token_ids, rows.to(weight.dtype))


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
    lora.remove()  # the hooks and the head's added rows first: its weight is a plain parameter again
    for key, module in lora.layers.items():
        module.weight += (lora.B[key] @ lora.A[key]).to(module.weight.dtype) * lora.scale
    if lora.tokens:
        for weight, rows in [(model.embed_tokens.weight, lora.embed_rows), (model.lm_head.weight, lora.head_rows)]:
            if rows is not None:  # (a tied head's rows are the embedding's, added once)
                weight.index_add_(0, lora.token_ids, rows.to(weight.dtype))
    del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
