//! Host-side policies: which heads keep what. They produce [`crate::LayerLayout`]s and budgets;
//! the kernels only ever see the resulting segment tables.

pub mod budget;
pub mod head_scores;
pub mod heads;
