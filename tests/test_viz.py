"""Figure builders take plain data and return plotly figures with that data in them."""
import numpy as np

from workbench.viz import (attention_grid, attention_heatmap, block_error_heatmap, layer_role_matrix, pareto_front,
                           recall_of, save_figure, sensitivity_heatmap, sparsity_heatmap, sweep_figure,
                           tradeoff_figure)


def test_pareto_front():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 6)]
    assert pareto_front(pts) == [0, 1, 3]


def test_tradeoff_and_sweep_figures_hold_the_data(tmp_path):
    rows = [{"policy": "a", "mb": 10, "kld_mean": 0.1}, {"policy": "b", "mb": 20, "kld_mean": 0.01},
            {"policy": "c", "mb": 30, "kld_mean": 0.05}]
    fig = tradeoff_figure(rows, "mb", "kld_mean")
    assert list(fig.data[0].x) == [10, 20, 30]
    assert list(fig.data[-1].x) == [10, 20]  # the front skips the dominated point c
    sweep = sweep_figure([dict(r, rule="x", s=i) for i, r in enumerate(rows)], "s", ["kld_mean"], "rule")
    assert list(sweep.data[0].y) == [0.1, 0.01, 0.05]
    written = save_figure(fig, tmp_path / "fig", png=False)
    assert written[0].read_text().count("plotly") > 10  # self-contained HTML with plotly.js inlined


def test_layer_role_matrix_and_heatmap():
    modules = [{"fqn": "model.layers.0.mlp.up_proj", "role": "up", "params": 10, "achieved_sparsity": 0.5},
               {"fqn": "model.layers.1.mlp.up_proj", "role": "up", "params": 10, "achieved_sparsity": 0.25},
               {"fqn": "model.layers.1.self_attn.q_proj", "role": "q", "params": 10, "achieved_sparsity": None},
               {"fqn": "lm_head", "role": "lm_head", "params": 10}]
    layers, roles, m = layer_role_matrix(modules)
    assert layers == [0, 1] and roles == ["q", "up"]
    assert m == [[None, 0.5], [0.0, 0.25]]
    fig = sparsity_heatmap(layers, roles, m)
    assert [list(row) for row in fig.data[0].z] == m  # the matrix as given, gaps kept as None


def test_attention_views_downsample_long_prompts():
    t = 300
    probs = np.tril(np.ones((t, t), np.float32))
    probs /= probs.sum(-1, keepdims=True)
    kept = np.tril(np.ones((t, t), bool))
    kept[:, 10:20] = False
    fig = attention_heatmap(probs, [f"t{i}" for i in range(t)], kept, max_cells=100)
    assert np.asarray(fig.data[0].z).shape == (100, 100)
    assert "max-pooled 3x3" in fig.layout.title.text
    assert 0 < recall_of(probs, kept) < 1
    grid = attention_grid({0: probs[None], 1: probs[None]}, [0, 1], [0], {0: kept[None], 1: kept[None]})
    assert len(grid.data) == 2 and "r=" in grid.layout.annotations[0].text


def test_quantization_views():
    fig = sensitivity_heatmap([0, 1], ["int4", "int8"], [[0.01, 0.001], [0.02, 0.0001]])
    assert np.asarray(fig.data[0].z).shape == (2, 2)
    err = np.random.default_rng(0).normal(size=(128, 256))
    assert np.asarray(block_error_heatmap(err, 64).data[0].z).shape == (2, 4)


def test_attention_grid_of_a_whole_small_model_stays_drawable():
    """30 layers x 9 heads x 512 tokens (the default model's shape): thumbnails pooled to 48 x 48 cells,
    and the figure says so."""
    rng = np.random.default_rng(0)
    probs = rng.random((9, 512, 512), dtype=np.float32).astype(np.float16)
    dense = {l: probs for l in range(30)}
    fig = attention_grid(dense, list(range(30)), list(range(9)))
    assert len(fig.data) == 270
    assert all(np.asarray(tr.z).shape == (47, 47) for tr in fig.data)  # 512 tokens in 11-token cells
    assert "max-pooled 11x11 from 512 tokens" in fig.layout.title.text
