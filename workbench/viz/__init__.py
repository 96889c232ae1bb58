"""Plotly figure builders: plain data in (lists, arrays, dicts), a figure out. No engine imports."""
from workbench.viz.attention import attention_grid, attention_heatmap, needle_figure, recall_of
from workbench.viz.experts import expert_load_figure
from workbench.viz.export import save_figure
from workbench.viz.lora import loss_figure, recovery_figure
from workbench.viz.quant import block_error_heatmap, sensitivity_heatmap
from workbench.viz.sparsity import layer_role_matrix, sparsity_heatmap
from workbench.viz.serving import serving_figure
from workbench.viz.speed import speed_figure, speedup_figure
from workbench.viz.tradeoff import pareto_front, sweep_figure, tradeoff_figure

__all__ = ["save_figure", "sweep_figure", "tradeoff_figure", "pareto_front", "layer_role_matrix",
           "sparsity_heatmap", "sensitivity_heatmap", "block_error_heatmap", "attention_heatmap", "attention_grid",
           "needle_figure", "recall_of", "speed_figure", "speedup_figure", "loss_figure", "recovery_figure",
           "serving_figure", "expert_load_figure"]
