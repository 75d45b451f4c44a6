//! One stack of layers split at their attention, run forward without autodiff and
//! replayed backward from what was kept; and the gradient plumbing every segment of
//! a recomputed step shares.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Tensor};
use longview_models::attention::{SplitAtAttention, attend_with_lse, attention_input_grads};

use super::Recompute;

/// What the forward pass kept of one layer: its input and, attention-aware, the
/// attention output and LSE. Tensors without autodiff.
pub(crate) struct Kept {
    x: Tensor<3>,
    attention: Option<(Tensor<4>, Option<Tensor<3>>)>,
}

/// Runs a stack without autodiff, keeping what `mode` asks for.
pub(crate) fn forward_stack<L: SplitAtAttention>(
    layers: &[L],
    context: &L::Context,
    mut x: Tensor<3>,
    mode: Recompute,
) -> (Tensor<3>, Vec<Kept>) {
    let mut kept = Vec::with_capacity(layers.len());
    for layer in layers {
        let next = if mode == Recompute::AttentionAware {
            let input = layer.attention_input(x.clone(), context);
            let (o, lse) = attend_with_lse(layer.attention_impl(), input);
            let next = layer.after_attention(x.clone(), o.clone());
            kept.push(Kept {
                x,
                attention: Some((o, lse)),
            });
            next
        } else {
            let next = layer.forward_split(x.clone(), context);
            kept.push(Kept { x, attention: None });
            next
        };
        x = next;
    }
    (x, kept)
}

/// Replays a stack last layer first from what [`forward_stack`] kept, moving the
/// parameters' gradients of `model` (the whole model the layers belong to) into
/// `into`; returns the gradient of the stack's input.
pub(crate) fn backward_stack<L: SplitAtAttention, M: Module>(
    model: &M,
    layers: &[L],
    context: &L::Context,
    kept: Vec<Kept>,
    mut grad: Tensor<3>,
    into: &mut GradientsParams,
) -> Tensor<3> {
    for (layer, kept) in layers.iter().zip(kept).rev() {
        let x = kept.x.clone().autodiff().require_grad();
        grad = match kept.attention {
            None => {
                let out = layer.forward_split(x.clone(), context);
                let mut grads = surrogate(out, grad).backward();
                take_grads(model, &mut grads, into);
                grad_or_zeros(&x, &grads)
            }
            Some((o, lse)) => {
                // After the attention: o_proj, residuals, MLP; gives dO.
                let o_leaf = o.clone().autodiff().require_grad();
                let out = layer.after_attention(x.clone(), o_leaf.clone());
                let mut grads = surrogate(out, grad).backward();
                take_grads(model, &mut grads, into);
                let grad_residual = grad_or_zeros(&x, &grads);
                let d_o = grad_or_zeros(&o_leaf, &grads);
                // The attention's backward from the kept O and LSE, then the parts before it.
                let x = kept.x.autodiff().require_grad();
                let input = layer.attention_input(x.clone(), context);
                let (dq, dk, dv) = attention_input_grads(
                    layer.attention_impl(),
                    input.clone(),
                    o.autodiff(),
                    lse.map(|l| l.autodiff()),
                    d_o,
                );
                let total =
                    surrogate(input.q, dq) + surrogate(input.k, dk) + surrogate(input.v, dv);
                let mut grads = total.backward();
                take_grads(model, &mut grads, into);
                grad_residual + grad_or_zeros(&x, &grads)
            }
        };
    }
    grad
}

/// `sum(out * grad)`: its gradient with respect to `out` is `grad` exactly.
pub(crate) fn surrogate<const D: usize>(out: Tensor<D>, grad: Tensor<D>) -> Tensor<1> {
    let dtype = out.dtype();
    (out * grad.cast(dtype)).sum()
}

/// The gradient of a leaf, zeros where nothing reached it.
pub(crate) fn grad_or_zeros<const D: usize>(leaf: &Tensor<D>, grads: &Gradients) -> Tensor<D> {
    leaf.grad(grads)
        .unwrap_or_else(|| Tensor::zeros(leaf.dims(), (&leaf.device(), leaf.dtype())))
}

/// Moves the gradients of `module`'s parameters found in `grads` into `into`, adding
/// to what is there (a parameter used by two segments: a tied LM head, a layer
/// replayed in two parts). Parameters a segment did not touch are skipped, so the
/// whole model can be passed for any segment.
pub(crate) fn take_grads<M: Module>(module: &M, grads: &mut Gradients, into: &mut GradientsParams) {
    struct Take<'a> {
        grads: &'a mut Gradients,
        into: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Take<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let Some(grad) = param.val().grad_remove(self.grads) else {
                return;
            };
            let grad = match self.into.remove::<D>(param.id) {
                Some(previous) => previous + grad,
                None => grad,
            };
            self.into.register::<D>(param.id, grad);
        }
    }
    module.visit(&mut Take { grads, into });
}

/// Whether any parameter of `module` trains.
pub(crate) fn trains<M: Module>(module: &M) -> bool {
    struct Any(bool);
    impl ModuleVisitor for Any {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 |= param.is_require_grad();
        }
    }
    let mut any = Any(false);
    module.visit(&mut any);
    any.0
}
