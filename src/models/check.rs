//! Loaded weights are checked before anything uses them: a checkpoint or state_dict can hold
//! NaN, an infinity or a negative running variance (a damaged file, or one written by hand),
//! and a model built from it would evaluate to a meaningless accuracy without any error.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

use super::Model;

/// The first tensor of `model` (in module order) that no trained model can hold, named by its
/// path (`bn1.running_var`) with what is wrong with it.
pub fn check_weights(model: &Model) -> Result<(), String> {
    let mut visitor = Checker::default();
    model.visit(&mut visitor);
    visitor.problem.map_or(Ok(()), Err)
}

#[derive(Default)]
struct Checker {
    /// Field names from the model down to the tensor being visited.
    path: Vec<String>,
    problem: Option<String>,
}

impl ModuleVisitor for Checker {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(match container_type.starts_with("Enum:") {
            true => String::new(), // the Model variant names the architecture, not a layer
            false => name.to_string(),
        });
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.problem.is_some() {
            return;
        }
        let name = self
            .path
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(".");
        let variance = name.ends_with("running_var");
        let data = param.val().into_data();
        for (i, v) in data.iter::<f32>().enumerate() {
            let what = if !v.is_finite() {
                format!("holds {v} at index {i}")
            } else if variance && v < 0.0 {
                format!("holds a negative variance {v} at index {i}")
            } else {
                continue;
            };
            self.problem = Some(format!("{name} {what}"));
            return;
        }
    }
}
