//! One switch per fused op: the engine runs each op either as its fused kernel or as the
//! plain composition of one-op kernels and GEMMs that an eager framework would run (the
//! `*_unfused` functions of `tigon-kernels`), so that any fused kernel can be turned off to
//! measure what it buys or to take it out of the picture when debugging, and
//! [`Fusion::none`] runs the whole step unfused.
//!
//! The switches, and what "off" runs instead:
//! - `rms_norm`: the layer norms, the final norm and Qwen3's q/k norms as upcast, square,
//!   mean, rsqrt, scale, downcast, weight multiply (and the backward through those; the
//!   fused backward of a layer norm also adds the residual stream's gradient, which off is
//!   a separate add);
//! - `rope`: cos/sin tables built per call, `x cos + rotate_half(x) sin`;
//! - `swiglu`: `silu(g)` stored, then `* u`; the backward's three products;
//! - `attention`: `repeat_kv`, materialized `[heads, n, n]` scores per document, a causal
//!   softmax kernel, `P V`; the backward recomputes the probabilities;
//! - `linear_cross_entropy`: the full logits, an op-by-op cross-entropy, two gradient GEMMs;
//! - `lora_linear`: each product its own GEMM, with the scaling, the bias, the branch sum
//!   and the accumulation of dA, dB as separate kernels (the fused path folds them into
//!   GEMM epilogues and, without dropout, batches the rank-r products of the adapters that
//!   share an input, q/k/v and gate/up: `tigon_kernels::ops::lora_group`);
//! - `adamw`: the gradient norm and the optimizer as one kernel per elementwise op per
//!   tensor (torch's for-loop AdamW) instead of one multi-tensor launch each.
//!
//! The embedding gather, the forward's residual adds and the bias add of a projection without an
//! adapter are single kernels either way, so they have no switch. On the CPU every op has one
//! implementation, the reference, so the switches change nothing there.

use std::fmt;
use std::str::FromStr;

use tigon_kernels::ops::activation_mul::{
    gated_act_backward, gated_act_backward_unfused, gated_act_forward, gated_act_forward_unfused,
    GatedAct,
};
use tigon_kernels::ops::adamw::{
    adamw_step, adamw_step_unfused, grad_norm, grad_norm_unfused, AdamW, AdamWTensors,
};
use tigon_kernels::ops::attention::{
    attention_backward_docs, attention_backward_unfused_docs, attention_forward_docs,
    attention_forward_unfused_docs, Attention, AttentionBackward, AttentionForward,
    AttentionKernel, Docs,
};
use tigon_kernels::ops::elementwise::add_inplace;
use tigon_kernels::ops::fused_linear_cross_entropy::{
    fused_linear_cross_entropy, linear_cross_entropy_unfused, FlceOut, FusedLinearCrossEntropy,
};
use tigon_kernels::ops::lora_linear::{
    lora_linear_backward, lora_linear_backward_dx, lora_linear_backward_dx_unfused,
    lora_linear_backward_unfused, lora_linear_forward, lora_linear_forward_unfused, LoraForward,
    LoraLinear,
};
use tigon_kernels::ops::rms_norm::{
    rms_norm_backward, rms_norm_backward_add_inplace, rms_norm_backward_inplace,
    rms_norm_backward_unfused, rms_norm_forward, rms_norm_forward_unfused, RmsNorm, RmsNormForward,
};
use tigon_kernels::ops::rope::{
    rope_backward, rope_backward_unfused, rope_forward, rope_forward_unfused, RopeConfig,
};
use tigon_kernels::{Result as KResult, Tensor};

use crate::error::EngineError;

/// Which ops run fused (`true`) or as the plain composition (`false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fusion {
    pub rms_norm: bool,
    pub rope: bool,
    pub swiglu: bool,
    pub attention: bool,
    pub linear_cross_entropy: bool,
    pub lora_linear: bool,
    pub adamw: bool,
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::all()
    }
}

impl Fusion {
    /// The switches' names, in the order specs and messages list them.
    pub const OPS: [&'static str; 7] = [
        "rms_norm",
        "rope",
        "swiglu",
        "attention",
        "linear_cross_entropy",
        "lora_linear",
        "adamw",
    ];

    /// Every fused kernel on (the engine's default).
    pub fn all() -> Fusion {
        Fusion::uniform(true)
    }

    /// Every op as its plain composition.
    pub fn none() -> Fusion {
        Fusion::uniform(false)
    }

    fn uniform(on: bool) -> Fusion {
        Fusion {
            rms_norm: on,
            rope: on,
            swiglu: on,
            attention: on,
            linear_cross_entropy: on,
            lora_linear: on,
            adamw: on,
        }
    }

    fn slot(&mut self, op: &str) -> Option<&mut bool> {
        Some(match op {
            "rms_norm" => &mut self.rms_norm,
            "rope" => &mut self.rope,
            "swiglu" => &mut self.swiglu,
            "attention" => &mut self.attention,
            "linear_cross_entropy" => &mut self.linear_cross_entropy,
            "lora_linear" => &mut self.lora_linear,
            "adamw" => &mut self.adamw,
            _ => return None,
        })
    }

    /// Whether the op named `op` (one of [`Fusion::OPS`]) runs fused.
    pub fn is_fused(&self, op: &str) -> Option<bool> {
        let mut copy = *self;
        copy.slot(op).map(|b| *b)
    }
}

/// `all`, `none`, a list of the ops to fuse (`rms_norm,swiglu`: those on, the rest off), or
/// `all` followed by ops to turn off (`all,-rope`; a list that starts with `-op` starts from
/// `all` too). Items apply left to right; spaces around items are ignored.
impl FromStr for Fusion {
    type Err = EngineError;

    fn from_str(spec: &str) -> Result<Fusion, EngineError> {
        let bad = |why: String| {
            EngineError::Fusion(format!(
                "{why} in fusion spec \"{spec}\"; valid: all, none, or a comma-separated list of \
                 ops to fuse (-op to turn one off): {}",
                Fusion::OPS.join(", ")
            ))
        };
        let items: Vec<&str> = spec.split(',').map(str::trim).collect();
        if items.iter().any(|i| i.is_empty()) {
            return Err(bad("an empty item".into()));
        }
        let mut f = if items[0] == "all" || items[0].starts_with('-') {
            Fusion::all()
        } else {
            Fusion::none()
        };
        for item in items {
            match item {
                "all" => f = Fusion::all(),
                "none" => f = Fusion::none(),
                _ => {
                    let (op, on) = match item.strip_prefix('-') {
                        Some(op) => (op, false),
                        None => (item.strip_prefix('+').unwrap_or(item), true),
                    };
                    match f.slot(op) {
                        Some(s) => *s = on,
                        None => return Err(bad(format!("unknown op `{op}`"))),
                    }
                }
            }
        }
        Ok(f)
    }
}

/// The shortest spec that parses back to the same switches: `all`, `none`, `all,-op,...`
/// when most are on, else the list of the ops on.
impl fmt::Display for Fusion {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (on, off): (Vec<&str>, Vec<&str>) = Fusion::OPS
            .iter()
            .partition(|op| self.is_fused(op) == Some(true));
        if off.is_empty() {
            write!(out, "all")
        } else if on.is_empty() {
            write!(out, "none")
        } else if on.len() > off.len() {
            let minus: Vec<String> = off.iter().map(|op| format!("-{op}")).collect();
            write!(out, "all,{}", minus.join(","))
        } else {
            write!(out, "{}", on.join(","))
        }
    }
}

// The dispatch: every call site in the engine goes through these, so one switch covers
// every use of its op (forward, recomputation, backward, evaluation).
impl Fusion {
    pub(crate) fn rms_norm_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        p: RmsNorm,
    ) -> KResult<RmsNormForward> {
        if self.rms_norm {
            rms_norm_forward(x, w, p)
        } else {
            rms_norm_forward_unfused(x, w, p)
        }
    }

    /// dx alone (the norm weights are frozen).
    pub(crate) fn rms_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        p: RmsNorm,
    ) -> KResult<Tensor> {
        let b = if self.rms_norm {
            rms_norm_backward(dy, x, w, rstd, p, false)?
        } else {
            rms_norm_backward_unfused(dy, x, w, rstd, p, false)?
        };
        Ok(b.dx)
    }

    /// dx written over `dy`, plus `residual` (the residual stream's gradient) when given:
    /// one kernel (fused), or the backward replacing `dy` and then the add (unfused).
    pub(crate) fn rms_norm_backward_inplace(
        &self,
        dy: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        p: RmsNorm,
        residual: Option<&Tensor>,
    ) -> KResult<()> {
        match (self.rms_norm, residual) {
            (true, Some(res)) => rms_norm_backward_add_inplace(dy, x, w, rstd, p, res),
            (true, None) => rms_norm_backward_inplace(dy, x, w, rstd, p),
            (false, _) => {
                *dy = rms_norm_backward_unfused(dy, x, w, rstd, p, false)?.dx;
                residual.map_or(Ok(()), |res| add_inplace(dy, res, 1.0))
            }
        }
    }

    pub(crate) fn rope_forward(
        &self,
        q: &mut Tensor,
        k: &mut Tensor,
        positions: &Tensor,
        cfg: &RopeConfig,
    ) -> KResult<()> {
        if self.rope {
            rope_forward(q, k, positions, cfg)
        } else {
            rope_forward_unfused(q, k, positions, cfg)
        }
    }

    pub(crate) fn rope_backward(
        &self,
        dq: &mut Tensor,
        dk: &mut Tensor,
        positions: &Tensor,
        cfg: &RopeConfig,
    ) -> KResult<()> {
        if self.rope {
            rope_backward(dq, dk, positions, cfg)
        } else {
            rope_backward_unfused(dq, dk, positions, cfg)
        }
    }

    pub(crate) fn attention_forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        docs: &Docs,
        p: &Attention,
    ) -> KResult<AttentionForward> {
        if self.attention {
            attention_forward_docs(q, k, v, docs, p, AttentionKernel::Auto)
        } else {
            attention_forward_unfused_docs(q, k, v, docs, p)
        }
    }

    pub(crate) fn attention_backward(
        &self,
        dout: &Tensor,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, lse): (&Tensor, &Tensor),
        docs: &Docs,
        p: &Attention,
    ) -> KResult<AttentionBackward> {
        if self.attention {
            attention_backward_docs(dout, (q, k, v), (o, lse), docs, p, AttentionKernel::Auto)
        } else {
            attention_backward_unfused_docs(dout, (q, k, v), (o, lse), docs, p)
        }
    }

    pub(crate) fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> KResult<Tensor> {
        if self.swiglu {
            gated_act_forward(gate, up, GatedAct::Silu)
        } else {
            gated_act_forward_unfused(gate, up, GatedAct::Silu)
        }
    }

    /// `gate` becomes dgate and `up` becomes dup.
    pub(crate) fn swiglu_backward(
        &self,
        dy: &Tensor,
        gate: &mut Tensor,
        up: &mut Tensor,
    ) -> KResult<()> {
        if self.swiglu {
            gated_act_backward(dy, gate, up, GatedAct::Silu)
        } else {
            gated_act_backward_unfused(dy, gate, up, GatedAct::Silu)
        }
    }

    /// `x_lora`: the adapter's input when it is not x (LoRA dropout).
    pub(crate) fn lora_forward(
        &self,
        layer: &LoraLinear,
        x: &Tensor,
        x_lora: Option<&Tensor>,
    ) -> KResult<LoraForward> {
        if self.lora_linear {
            lora_linear_forward(layer, x, x_lora)
        } else {
            lora_linear_forward_unfused(layer, x, x_lora)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_backward(
        &self,
        layer: &LoraLinear,
        dy: &Tensor,
        x: &Tensor,
        xa: &Tensor,
        da: &mut Tensor,
        db: &mut Tensor,
        need_dx: bool,
    ) -> KResult<Option<Tensor>> {
        if self.lora_linear {
            lora_linear_backward(layer, dy, x, xa, da, db, need_dx)
        } else {
            lora_linear_backward_unfused(layer, dy, x, xa, da, db, need_dx)
        }
    }

    pub(crate) fn lora_backward_dx(&self, layer: &LoraLinear, dy: &Tensor) -> KResult<Tensor> {
        if self.lora_linear {
            lora_linear_backward_dx(layer, dy)
        } else {
            lora_linear_backward_dx_unfused(layer, dy)
        }
    }

    pub(crate) fn linear_cross_entropy(
        &self,
        h: &Tensor,
        w: &Tensor,
        labels: &Tensor,
        p: &FusedLinearCrossEntropy,
    ) -> KResult<FlceOut> {
        if self.linear_cross_entropy {
            fused_linear_cross_entropy(h, w, labels, p, None)
        } else {
            linear_cross_entropy_unfused(h, w, labels, p, None)
        }
    }

    pub(crate) fn grad_norm(&self, grads: &[&Tensor]) -> KResult<Tensor> {
        if self.adamw {
            grad_norm(grads)
        } else {
            grad_norm_unfused(grads)
        }
    }

    pub(crate) fn adamw_step(
        &self,
        tensors: &mut [AdamWTensors],
        step: u64,
        p: &AdamW,
        max_grad_norm: Option<(f32, &Tensor)>,
    ) -> KResult<()> {
        if self.adamw {
            adamw_step(tensors, step, p, max_grad_norm, true)
        } else {
            adamw_step_unfused(tensors, step, p, max_grad_norm, true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Fusion {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_all_none_lists_and_exclusions() {
        assert_eq!(parse("all"), Fusion::all());
        assert_eq!(parse("none"), Fusion::none());
        assert_eq!(Fusion::default(), Fusion::all());
        let f = parse("all,-rope");
        assert_eq!(
            f,
            Fusion {
                rope: false,
                ..Fusion::all()
            }
        );
        assert_eq!(parse("-rope"), f);
        assert_eq!(parse(" all , -rope "), f);
        assert_eq!(
            parse("rms_norm,swiglu"),
            Fusion {
                rms_norm: true,
                swiglu: true,
                ..Fusion::none()
            }
        );
        assert_eq!(
            parse("none,attention,+adamw"),
            Fusion {
                attention: true,
                adamw: true,
                ..Fusion::none()
            }
        );
        // Left to right: a later item wins.
        assert_eq!(parse("rope,none"), Fusion::none());
        assert_eq!(parse("all,-lora_linear,lora_linear"), Fusion::all());
        // Each switch by its name.
        for op in Fusion::OPS {
            let f = parse(op);
            for other in Fusion::OPS {
                assert_eq!(f.is_fused(other), Some(other == op), "{op} / {other}");
            }
        }
        assert_eq!(Fusion::all().is_fused("embedding"), None);
    }

    #[test]
    fn bad_specs_name_the_problem_and_list_the_ops() {
        for (spec, want) in [
            ("rope,flash", "unknown op `flash`"),
            ("all,-rms", "unknown op `rms`"),
            ("", "an empty item"),
            ("rope,,swiglu", "an empty item"),
        ] {
            let e = spec.parse::<Fusion>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
            assert!(
                e.contains(
                    "rms_norm, rope, swiglu, attention, linear_cross_entropy, lora_linear, adamw"
                ),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        assert_eq!(Fusion::all().to_string(), "all");
        assert_eq!(Fusion::none().to_string(), "none");
        let most = Fusion {
            rope: false,
            adamw: false,
            ..Fusion::all()
        };
        assert_eq!(most.to_string(), "all,-rope,-adamw");
        let few = Fusion {
            attention: true,
            ..Fusion::none()
        };
        assert_eq!(few.to_string(), "attention");
        // Every one of the 128 combinations parses back to itself.
        for bits in 0u32..1 << Fusion::OPS.len() {
            let mut f = Fusion::none();
            for (i, op) in Fusion::OPS.iter().enumerate() {
                *f.slot(op).unwrap() = bits & (1 << i) != 0;
            }
            assert_eq!(parse(&f.to_string()), f, "{f}");
        }
    }
}
