"""The training loss without full-vocabulary fp32 logits: a chunked linear + cross-entropy, or Liger's.

:func:`chunked_causal_lm_loss` computes transformers' causal-LM loss from the last hidden states and
the output-projection weight, a chunk of tokens at a time, so the fp32 logits over the whole
vocabulary (151,936 columns for Qwen2.5) are never materialised at once. Gradients are computed
during the forward pass and kept (one ``[tokens, hidden]`` and one ``[vocab, hidden]`` tensor), as
Liger-Kernel's fused linear cross-entropy does. :func:`enable_memory_efficient_loss` makes a
``*ForCausalLM`` (PEFT-wrapped or not) compute its training loss this way (``loss_implementation``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value transformers' causal-LM loss (and torch's cross-entropy) ignores
# fp32 logits held per chunk: 512 MiB is ~880 tokens at Qwen2.5's 151,936-token vocabulary (the full
# logits of 8 x 2048 tokens would take 10 GB in fp32), one chunk for small vocabularies. Smaller chunks
# cost time on an H100: each chunk adds one fp32 read-modify-write of the [vocab, hidden] weight gradient.
DEFAULT_CHUNK_LOGITS_BYTES = 512 * 2**20
# Keyword arguments the Trainer or a collator pass for the loss only; the decoder must not see them.
LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
PATCHED_MARKER = "_llmtrain_loss_backend"


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_LOGITS_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``budget_bytes``.

    >>> default_chunk_size(151936)
    883
    >>> default_chunk_size(4096)
    32768
    """
    return max(1, budget_bytes // (4 * vocab_size))


def _compute_dtype(device: torch.device, tensor_dtype: torch.dtype) -> torch.dtype:
    """The dtype the standard ``lm_head`` matmul would run in: autocast's if active, else the input's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return tensor_dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T, target_i)`` over rows whose targets are all counted (none ignored).

    Forward walks the rows in chunks: fp32 logits of one chunk, its loss terms and, when needed,
    its gradients w.r.t. ``hidden`` and ``weight`` (accumulated in fp32). Backward only scales the
    stored gradients by ``grad_output``, in place, so it may run once per forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_dtype = _compute_dtype(hidden.device, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(compute_dtype)
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
            grad_weight = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
            )
            # Equal chunks: no small trailing chunk that costs a full weight-gradient update.
            n_chunks = max(1, math.ceil(hidden.shape[0] / chunk_size))
            chunk_size = max(1, math.ceil(hidden.shape[0] / n_chunks))
            for start in range(0, hidden.shape[0], chunk_size):
                hidden_c = hidden[start : start + chunk_size].to(compute_dtype)
                target_c = targets[start : start + chunk_size]
                logits = (hidden_c @ weight_c.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum += (lse - logits.gather(1, target_c[:, None]).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(CE)/d(logits) = softmax - one_hot, computed in place over the chunk's logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits.scatter_add_(
                    1, target_c[:, None], torch.full_like(target_c[:, None], -1, dtype=grad_logits.dtype)
                )
                grad_logits_c = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits_c @ weight_c
                if grad_weight is not None and compute_dtype == torch.float32:
                    grad_weight.addmm_(grad_logits_c.T, hidden_c)
                elif grad_weight is not None:
                    grad_weight.add_(grad_logits_c.T @ hidden_c)  # upcast inside the add, no fp32 temporary
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        ctx.consumed = False
        return loss_sum

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.consumed:
            raise RuntimeError("the chunked cross-entropy's stored gradients were already used (retain_graph?)")
        ctx.consumed = True
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0).mul_(grad_output) if ctx.has_grads[0] else None
        grad_weight = saved.pop(0).mul_(grad_output).to(ctx.weight_dtype) if ctx.has_grads[1] else None
        return grad_hidden, grad_weight, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden_states @ lm_head_weight.T`` without full-vocabulary logits.

    Same contract as ``transformers.loss.loss_utils.ForCausalLMLoss``: ``labels`` (``[batch, seq]``)
    are shifted left by one inside the loss with ``ignore_index`` appended to every row (or
    ``shift_labels`` is used as given); positions labelled ``ignore_index`` do not count; the sum
    of token losses is divided by ``num_items_in_batch`` when given, else by the number of counted
    tokens. With no counted token the loss is NaN (0/0) and every gradient is zero, as in
    transformers. Logits are computed in the dtype the standard ``lm_head`` would use (autocast's,
    else the inputs'), then upcast to fp32 for the log-softmax, ``chunk_size`` tokens at a time
    (default :func:`default_chunk_size`); only counted tokens reach the projection. Finding them is
    one device sync per call.

    >>> hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> labels = torch.tensor([[-100, 1, 0]])
    >>> chunked_causal_lm_loss(hidden, weight, labels, chunk_size=1)  # both counted tokens: log(1 + e)
    tensor(1.3133)
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked_causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"{targets.numel()} labels for {hidden.shape[0]} hidden-state rows")
    counted = (targets != ignore_index).nonzero().squeeze(1)
    if num_items_in_batch is None:
        denominator = torch.tensor(float(counted.numel()), device=hidden.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if counted.numel() == 0:
        # 0/0 = NaN like transformers, with zero (not NaN) gradients for every input.
        zero = hidden.sum() * 0.0 + lm_head_weight.sum() * 0.0
        return zero + torch.zeros((), device=hidden.device) / denominator
    if counted.numel() < targets.numel():
        hidden, targets = hidden.index_select(0, counted), targets.index_select(0, counted)
    size = chunk_size or default_chunk_size(lm_head_weight.shape[0])
    loss_sum = _ChunkedLinearCrossEntropy.apply(hidden, lm_head_weight, targets, size)
    assert isinstance(loss_sum, torch.Tensor)
    # Autograd hands 1/denominator to backward as grad_output, which scales the stored gradients.
    return loss_sum / denominator


def _liger_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same contract as :func:`chunked_causal_lm_loss`, through Liger-Kernel's Triton kernel."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if shift_labels is None:
        assert labels is not None
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    # Liger's kernel is not autocast-aware: give it both operands in the dtype lm_head would use.
    dtype = _compute_dtype(hidden_states.device, hidden_states.dtype)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype)
    loss_sum = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(
        lm_head_weight.to(dtype), hidden, targets
    )
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    return loss_sum.float() / denominator


def find_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The innermost ``*ForCausalLM`` with an ``lm_head`` (through PEFT or other wrappers).

    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> config = Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> type(find_causal_lm(Qwen2ForCausalLM(config))).__name__
    'Qwen2ForCausalLM'
    """
    for module in model.modules():
        if (
            isinstance(module, PreTrainedModel)
            and type(module).__name__.endswith("ForCausalLM")
            and hasattr(module, "lm_head")
            and hasattr(module, "model")
        ):
            return module
    raise TypeError(f"no *ForCausalLM with an lm_head inside {type(model).__name__}")


def _plain_linear_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The weight of a bias-free ``nn.Linear``; None for anything else (a LoRA-wrapped head, a bias).

    Also None for a weight that only exists inside the module's own forward: DeepSpeed ZeRO-3
    partitions it (``ds_id``) and gathers it in a forward pre-hook, which this path would skip.
    """
    if type(lm_head) is nn.Linear and lm_head.bias is None and not hasattr(lm_head.weight, "ds_id"):
        return lm_head.weight
    return None


def liger_available() -> bool:
    """Whether Liger-Kernel is importable (its Triton kernels also need a CUDA device)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_backend(requested: str, liger_installed: bool, cuda: bool) -> tuple[str, str | None]:
    """The loss backend to install for ``requested`` on this machine, and a warning when it is not the one asked for.

    ``auto`` takes Liger's fused linear cross-entropy where it can run (installed, CUDA), else the
    chunked loss. ``liger`` where it cannot run falls back to ``chunked`` with a warning, not a
    crash: a config written for a GPU node stays usable on a CPU box.

    >>> resolve_loss_backend("auto", True, True), resolve_loss_backend("auto", True, False)
    (('liger', None), ('chunked', None))
    >>> backend, warning = resolve_loss_backend("liger", False, True); backend, warning.split(";")[0]
    ('chunked', 'loss_implementation: liger needs the liger-kernel package, which is not installed')
    """
    if requested not in ("auto", "liger", "chunked"):
        raise ValueError(f"backend must be auto, liger or chunked, got {requested!r}")
    runs_here = liger_installed and cuda
    if requested == "auto":
        return ("liger" if runs_here else "chunked"), None
    if requested == "liger" and not runs_here:
        why = (
            "needs the liger-kernel package, which is not installed"
            if not liger_installed
            else "needs a CUDA GPU (its kernels are Triton)"
        )
        return "chunked", f"loss_implementation: liger {why}; using the chunked loss"
    return requested, None


def liger_kernels_problem(use_cpu: bool) -> str | None:
    """Why Liger's model patches (RMSNorm, RoPE, SwiGLU) cannot run here, or None when they can."""
    if not liger_available():
        return "the liger-kernel package is not installed"
    if use_cpu or not torch.cuda.is_available():
        return "Liger's kernels are Triton and need a CUDA GPU"
    return None


def enable_memory_efficient_loss(model: nn.Module, chunk_size: int | None = None, backend: str = "auto") -> str:
    """Make the model's training loss skip full-vocabulary logits; return the backend used.

    The innermost ``*ForCausalLM`` (:func:`find_causal_lm`; a PEFT wrapper is looked through)
    gets an instance-level ``forward`` that, when ``labels`` (or ``shift_labels``) are passed,
    runs the decoder (``self.model``) with every other keyword argument (``position_ids`` of
    packed rows, ``attention_mask``...) and returns ``CausalLMOutputWithPast(loss=..., logits=None)``
    with the loss of :func:`chunked_causal_lm_loss`. The original forward still runs when there
    are no labels, when ``logits_to_keep`` is set, or when ``lm_head`` is not a bias-free
    ``nn.Linear`` (LoRA on the head) or its weight is ZeRO-3-partitioned. Tied embeddings need
    nothing special: the shared weight gets both gradients. Model-parallel heads (FSDP/DTensor
    shards) are not handled.

    ``backend``: ``"auto"`` uses Liger-Kernel's fused linear cross-entropy when it is importable
    and CUDA is available (checked per call: a batch on the CPU still takes ours), else our chunked
    loss; ``"liger"`` or ``"chunked"`` insist on one (``"liger"`` where it cannot run: the chunked
    loss and a warning, see :func:`resolve_loss_backend`). Training mode only: in eval mode the original
    forward runs, so evaluation still gets logits. Returns the backend installed; calling it
    again returns the backend already installed.
    """
    causal_lm = find_causal_lm(model)
    installed = getattr(causal_lm, PATCHED_MARKER, None)
    if installed is not None:
        return str(installed)
    backend, warning = resolve_loss_backend(backend, liger_available(), torch.cuda.is_available())
    if warning is not None:
        logger.warning(warning)
    original_forward = causal_lm.forward

    def compute_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Any, loss_kwargs: dict[str, Any]) -> Any:
        if backend == "liger" and hidden.is_cuda:
            return _liger_causal_lm_loss(hidden, weight, labels, **loss_kwargs)
        return chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, **loss_kwargs)

    def forward(
        self: PreTrainedModel,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        weight = _plain_linear_weight(self.lm_head)
        has_targets = labels is not None or kwargs.get("shift_labels") is not None
        keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if not self.training or not has_targets or weight is None or not keeps_all:
            return original_forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        return_dict = kwargs.pop("return_dict", True)
        loss_kwargs = {key: kwargs.pop(key) for key in LOSS_ONLY_KWARGS if key in kwargs}
        decoder: Callable[..., Any] = self.model
        outputs = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        loss = compute_loss(outputs.last_hidden_state, weight, labels, loss_kwargs)
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict is not False else result.to_tuple()

    causal_lm.forward = types.MethodType(forward, causal_lm)
    setattr(causal_lm, PATCHED_MARKER, backend)
    logger.info("training loss: %s linear + cross-entropy (no full-vocabulary logits)", backend)
    return backend
