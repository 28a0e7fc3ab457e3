//! Host-side policies: which heads keep what. They produce [`crate::LayerLayout`]s and budgets;
//! the kernels only ever see the resulting segment tables.

pub mod budget;
pub mod head_scores;
pub mod heads;

/// Reads a policy file, naming `field` and the path in the error.
pub(crate) fn read_text(path: &std::path::Path, field: &str) -> crate::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| crate::Error::invalid(field, format!("{}: {e}", path.display())))
}
