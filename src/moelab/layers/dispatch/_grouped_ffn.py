"""The fused dropless expert computation shared by the ``sorted`` and ``grouped`` backends.

Shape legend: T tokens, S slots (sorted by expert here), D model dim, F expert hidden, E experts.

Both backends (1) stable-argsort the slots by expert (torchtitan ``_local_reorder``,
MegaBlocks/ScatterMoE ``sort``), (2) gather token rows into expert-contiguous order,
(3) run the expert FFN as a *grouped* matmul (one GEMM per expert over its contiguous rows),
(4) scale by the combine weights and scatter-add back to tokens. They differ only in the GEMM
primitive: ``LoopGemm`` calls ``torch.mm`` per expert into slices of one preallocated output,
``TorchGroupedGemm`` calls ``torch.nn.functional.grouped_mm`` (offsets int32, cumulative).

``GroupedFFN`` is one ``autograd.Function`` for gather -> FFN -> weight -> scatter, with a
hand-written backward. Compared with autograd over the same ops it saves the
``index``/``index_put`` pair (gather uses ``index_select``, its backward ``index_add_``), saves
one activation-sized temporary per elementwise step (in-place updates of buffers it owns) and
applies the combine weight on whichever side is narrower (the hidden ``[S, F]`` when F <= D,
else the output ``[S, D]``), which ScatterMoE also does to avoid materialising weighted copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layers.routing import RoutingResult


@dataclass
class Plan:
    """Slots grouped by expert: ``slot_S`` (sorted position -> routing slot), ``token_S``."""

    slot_S: Tensor
    token_S: Tensor
    counts: list[int]  # slots per expert (host copy: one device sync per forward)
    offs_E: Tensor  # int32 cumulative counts, grouped_mm's ``offs``
    num_tokens: int


def make_plan(routing: RoutingResult) -> Plan:
    """Stable sort by expert (stability keeps token order inside an expert: deterministic)."""
    expert_S = routing.expert_S
    E = routing.num_experts
    if E == 1:
        slot_S = torch.arange(expert_S.numel(), device=expert_S.device)
    else:
        slot_S = torch.sort(expert_S, stable=True).indices
    counts_E = torch.bincount(expert_S, minlength=E)
    return Plan(
        slot_S=slot_S,
        token_S=routing.token_S.index_select(0, slot_S),
        counts=counts_E.tolist(),
        offs_E=counts_E.cumsum(0).to(torch.int32),
        num_tokens=routing.num_tokens,
    )


class LoopGemm:
    """Grouped GEMM as one ``torch.mm`` per non-empty expert, written into slices (no cat)."""

    name = "loop"

    @staticmethod
    def mm_nt(a_SX: Tensor, w_EYX: Tensor, plan: Plan) -> Tensor:
        """Row block e of ``a`` times ``w[e]^T`` -> ``[S, Y]``."""
        out = a_SX.new_empty(a_SX.shape[0], w_EYX.shape[1])
        s = 0
        for e, n in enumerate(plan.counts):
            if n:
                torch.mm(a_SX[s : s + n], w_EYX[e].t(), out=out[s : s + n])
                s += n
        return out

    @staticmethod
    def mm_nn(a_SY: Tensor, w_EYX: Tensor, plan: Plan) -> Tensor:
        """Row block e of ``a`` times ``w[e]`` -> ``[S, X]``."""
        out = a_SY.new_empty(a_SY.shape[0], w_EYX.shape[2])
        s = 0
        for e, n in enumerate(plan.counts):
            if n:
                torch.mm(a_SY[s : s + n], w_EYX[e], out=out[s : s + n])
                s += n
        return out

    @staticmethod
    def wgrad(g_SY: Tensor, a_SX: Tensor, plan: Plan) -> Tensor:
        """Per expert ``g_e^T a_e`` -> ``[E, Y, X]`` (zero for experts with no rows)."""
        E = len(plan.counts)
        out = g_SY.new_empty(E, g_SY.shape[1], a_SX.shape[1])
        s = 0
        for e, n in enumerate(plan.counts):
            if n:
                torch.mm(g_SY[s : s + n].t(), a_SX[s : s + n], out=out[e])
                s += n
            else:
                out[e].zero_()
        return out


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class TorchGroupedGemm:
    """Grouped GEMM through ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm``).

    Requirements (checked by ``supports``): fp32/bf16/fp16 on CPU (no fp64), every row stride a
    multiple of 16 bytes (D and F multiples of 4 in fp32, 8 in bf16), ``offs`` int32 and ending
    at S (rows past the last offset are left uninitialised by the kernel). Experts with zero
    rows are fine: their output slice is empty and their weight gradient is zero.
    """

    name = "grouped"

    @staticmethod
    def supports(x: Tensor, d_ff: int) -> bool:
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
            return False
        per16 = 16 // x.element_size()
        return x.shape[-1] % per16 == 0 and d_ff % per16 == 0

    @staticmethod
    def mm_nt(a_SX: Tensor, w_EYX: Tensor, plan: Plan) -> Tensor:
        return _grouped_mm(a_SX, w_EYX.transpose(1, 2), plan.offs_E)

    @staticmethod
    def mm_nn(a_SY: Tensor, w_EYX: Tensor, plan: Plan) -> Tensor:
        return _grouped_mm(a_SY, w_EYX, plan.offs_E)

    @staticmethod
    def wgrad(g_SY: Tensor, a_SX: Tensor, plan: Plan) -> Tensor:
        return _grouped_mm(g_SY.t(), a_SX, plan.offs_E)


def ffn_forward(x_TD, w_S, w_gate_EFD, w_up_EFD, w_down_EDF, plan: Plan, gemm):
    """``(y_TD, saved)``: the forward of :class:`GroupedFFN`; ``saved`` holds what its backward reads."""
    tok = plan.token_S
    x_SD = x_TD.index_select(0, tok)
    Fh, D = w_up_EFD.shape[1], w_up_EFD.shape[2]
    scale_hidden = Fh <= D
    w_S1 = w_S.unsqueeze(1)
    if w_gate_EFD is not None:
        g_SF = gemm.mm_nt(x_SD, w_gate_EFD, plan)
        u_SF = gemm.mm_nt(x_SD, w_up_EFD, plan)
        a_SF = F.silu(g_SF)
        h_SF = a_SF * u_SF
    else:
        g_SF = a_SF = None
        u_SF = gemm.mm_nt(x_SD, w_up_EFD, plan)
        h_SF = F.gelu(u_SF)
    if scale_hidden:
        hw_SF = h_SF * w_S1
        o_SD, y_part = None, gemm.mm_nt(hw_SF, w_down_EDF, plan)
    else:
        hw_SF, o_SD = None, gemm.mm_nt(h_SF, w_down_EDF, plan)
        y_part = o_SD * w_S1
    y_TD = x_TD.new_zeros(plan.num_tokens, D).index_add_(0, tok, y_part)
    return y_TD, (x_SD, g_SF, u_SF, a_SF, h_SF, hw_SF, o_SD, scale_hidden)


class GroupedFFN(torch.autograd.Function):
    """y_TD = sum over slots s of w_s * FFN_{e_s}(x_{t_s}); slots already sorted by expert."""

    @staticmethod
    def forward(ctx, x_TD, w_S, w_gate_EFD, w_up_EFD, w_down_EDF, plan: Plan, gemm):  # type: ignore[override]
        y_TD, saved = ffn_forward(x_TD, w_S, w_gate_EFD, w_up_EFD, w_down_EDF, plan, gemm)
        # Inputs go through save_for_backward (version checks); intermediates are ctx attributes
        # so that backward can free each one as soon as it is used (lower peak memory).
        ctx.save_for_backward(w_S, w_gate_EFD, w_up_EFD, w_down_EDF)
        ctx.x_SD, ctx.g_SF, ctx.u_SF, ctx.a_SF, ctx.h_SF, ctx.hw_SF, ctx.o_SD, ctx.scale_hidden = saved
        ctx.plan, ctx.gemm = plan, gemm
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):  # type: ignore[override]
        w_S, w_gate, w_up, w_down = ctx.saved_tensors
        if ctx.x_SD is None:
            raise RuntimeError("GroupedFFN frees its activations in backward; backward twice (retain_graph) is not supported")
        x_SD, g_SF, u_SF, a_SF, h_SF, hw_SF, o_SD = ctx.x_SD, ctx.g_SF, ctx.u_SF, ctx.a_SF, ctx.h_SF, ctx.hw_SF, ctx.o_SD
        ctx.x_SD = ctx.g_SF = ctx.u_SF = ctx.a_SF = ctx.h_SF = ctx.hw_SF = ctx.o_SD = None
        plan, gemm = ctx.plan, ctx.gemm
        need_x, need_w, need_wg, need_wu, need_wd = ctx.needs_input_grad[:5]
        gy_TD = gy_TD.contiguous()
        go_SD = gy_TD.index_select(0, plan.token_S)
        w_S1 = w_S.unsqueeze(1)
        dw_S = dwd = None
        if ctx.scale_hidden:
            if need_wd:
                dwd = gemm.wgrad(go_SD, hw_SF, plan)
            del hw_SF
            dh_SF = gemm.mm_nn(go_SD, w_down, plan)  # d(loss)/d(hw)
            del go_SD
            if need_w:
                dw_S = torch.linalg.vecdot(dh_SF, h_SF)
            del h_SF
            dh_SF.mul_(w_S1)
        else:
            if need_w:
                dw_S = torch.linalg.vecdot(go_SD, o_SD)
            del o_SD
            go_SD.mul_(w_S1)
            if need_wd:
                dwd = gemm.wgrad(go_SD, h_SF, plan)
            del h_SF
            dh_SF = gemm.mm_nn(go_SD, w_down, plan)
            del go_SD
        dwg = dwu = dx_TD = None
        if w_gate is not None:
            du_SF = dh_SF.mul(a_SF)
            del a_SF
            dg_SF = torch.ops.aten.silu_backward(dh_SF.mul_(u_SF), g_SF)
            del dh_SF, g_SF, u_SF
            if need_wg:
                dwg = gemm.wgrad(dg_SF, x_SD, plan)
            if need_wu:
                dwu = gemm.wgrad(du_SF, x_SD, plan)
            del x_SD
            if need_x:
                dx_SD = gemm.mm_nn(dg_SF, w_gate, plan)
                del dg_SF
                dx_SD.add_(gemm.mm_nn(du_SF, w_up, plan))
        else:
            du_SF = torch.ops.aten.gelu_backward(dh_SF, u_SF)
            del dh_SF, u_SF
            if need_wu:
                dwu = gemm.wgrad(du_SF, x_SD, plan)
            del x_SD
            if need_x:
                dx_SD = gemm.mm_nn(du_SF, w_up, plan)
        del du_SF
        if need_x:
            dx_TD = gy_TD.new_zeros(plan.num_tokens, dx_SD.shape[1]).index_add_(0, plan.token_S, dx_SD)
        return dx_TD, dw_S, dwg, dwu, dwd, None, None


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _grouped_ffn(x_TD: Tensor, routing: RoutingResult, experts, gemm) -> Tensor:
    r = routing.kept()
    if r.num_slots == 0:
        return x_TD.new_zeros(r.num_tokens, x_TD.shape[1]) + 0.0 * x_TD.sum()
    plan = make_plan(r)
    w_S = r.weight_S.to(x_TD.dtype).index_select(0, plan.slot_S)
    args = (x_TD, w_S, experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF)
    if not _needs_graph(*args):  # no autograd.Function, nothing saved: the same arithmetic
        return ffn_forward(*args, plan, gemm)[0]
    return GroupedFFN.apply(*args, plan, gemm)


# runs eagerly under torch.compile: its data-dependent group sizes and the fp32 CPU grouped GEMM have
# no compile-time (fake tensor) support (torch 2.13 accepts only bf16 there)
_grouped_ffn_eager = torch.compiler.disable(_grouped_ffn)


def grouped_ffn(x_TD: Tensor, routing: RoutingResult, experts, gemm) -> Tensor:
    """Dropless sorted/grouped dispatch of the kept slots of ``routing`` (outside torch.compile the
    ``compiler.disable`` wrapper, which costs a frame-evaluation hook per call, is skipped)."""
    if torch.compiler.is_compiling():
        return _grouped_ffn_eager(x_TD, routing, experts, gemm)
    return _grouped_ffn(x_TD, routing, experts, gemm)
