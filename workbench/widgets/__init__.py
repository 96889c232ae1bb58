"""Live panels (ipywidgets + plotly FigureWidget) driven by the real engine: tune, and see it change."""
from workbench.widgets.attention import AttentionExplorer
from workbench.widgets.lora import LoRATrainer
from workbench.widgets.precision import PrecisionTuner
from workbench.widgets.scheduler import SchedulerDashboard
from workbench.widgets.sparsity import SparsityTuner

__all__ = ["SparsityTuner", "PrecisionTuner", "AttentionExplorer", "LoRATrainer", "SchedulerDashboard"]
