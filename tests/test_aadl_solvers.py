"""Least-squares solvers, the blocked kernels behind them, and gram/qr agreement."""

import math

import numpy as np
import pytest
import torch

from aadl import AndersonAcceleration, kernels
from aadl.solvers import (
    GRAM_ERROR_BOUND,
    GRAM_MAX_CONDITION,
    gram_error_estimate,
    solve_normal_equations,
    solve_r_factor,
)
from aadl_problems import LogisticProblem, run_wrapper


@pytest.fixture(params=["numba", "torch"])
def cpu_passes(request, monkeypatch):
    """Run the test with the CPU passes as numba loops and as torch operations."""
    if request.param == "numba" and kernels._compiled is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("AADL_CPU_KERNELS", request.param)
    assert kernels.compiled_loops_enabled() == (request.param == "numba")
    return request.param


def _least_squares(dR: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    h = dR.shape[1]
    A = np.vstack([dR, math.sqrt(lam) * np.eye(h)])
    return np.linalg.lstsq(A, np.concatenate([r, np.zeros(h)]), rcond=None)[0]


@pytest.mark.parametrize("lam", [0.0, 1e-3, 10.0])
def test_both_solvers_match_dense_least_squares(lam):
    rng = np.random.default_rng(0)
    dR = rng.standard_normal((200, 6))
    r = rng.standard_normal(200)
    expected = _least_squares(dR, r, lam)
    gram = torch.tensor(dR.T @ dR)
    by_gram = solve_normal_equations(gram, torch.tensor(dR.T @ r), lam)
    rows = torch.tensor(dR.T.copy())
    by_qr = solve_r_factor(kernels.streaming_r_factor(rows, torch.tensor(r)), lam)
    np.testing.assert_allclose(by_gram.coefficients.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(by_qr.coefficients.numpy(), expected, rtol=1e-10)
    # Both report cond([dR; sqrt(lam) I]).
    expected_condition = np.linalg.cond(np.vstack([dR, math.sqrt(lam) * np.eye(6)]))
    assert by_gram.condition == pytest.approx(expected_condition, rel=1e-8)
    assert by_qr.condition == pytest.approx(expected_condition, rel=1e-8)


def test_gram_refuses_ill_conditioned_systems_and_qr_returns_minimum_norm():
    rng = np.random.default_rng(1)
    column = rng.standard_normal(100)
    dR = np.stack([column, column, rng.standard_normal(100)], axis=1)  # rank 2
    r = rng.standard_normal(100)
    assert solve_normal_equations(torch.tensor(dR.T @ dR), torch.tensor(dR.T @ r), 0.0) is None
    solution = solve_r_factor(kernels.streaming_r_factor(torch.tensor(dR.T.copy()), torch.tensor(r)), 0.0)
    expected = np.linalg.lstsq(dR, r, rcond=None)[0]  # minimum-norm solution
    np.testing.assert_allclose(solution.coefficients.numpy(), expected, rtol=1e-8, atol=1e-12)
    assert solution.condition == math.inf or solution.condition > GRAM_MAX_CONDITION


GRAM_QR_SETTINGS = [
    dict(history=5),
    dict(history=3, frequency=2, relaxation=0.5),
    dict(history=4, frequency=3, store_every=2, regularization=1e-2),
    dict(history=6, relaxation=0.3, regularization=1e-4, mixing="paper_eq6"),
    dict(history=2, store_every=3, relaxation=0.8),
]


@pytest.mark.parametrize("settings", GRAM_QR_SETTINGS)
def test_gram_and_qr_give_the_same_iterates(settings):
    problem = LogisticProblem(seed=3)
    by_gram, gram_opt = run_wrapper(problem, 25, solver="gram", **settings)
    by_qr, _ = run_wrapper(problem, 25, solver="qr", **settings)
    for k, (a, b) in enumerate(zip(by_gram, by_qr), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"step {k}")
    assert gram_opt.stats.qr_fallbacks == 0  # the gram route really ran


def test_gram_and_qr_agree_in_float32_on_a_network(cpu_passes):
    """float32 parameters, blocks of CPU_BLOCK rows, several worker threads."""

    def run(solver):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 256))
        x, y = torch.randn(128, 64), torch.randn(128, 256)
        opt = AndersonAcceleration(
            torch.optim.SGD(net.parameters(), lr=0.1), history=4, safeguard="none", solver=solver,
            relaxation=0.5, regularization=1e-6,
        )
        for _ in range(8):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), opt

    by_gram, gram_opt = run("gram")
    by_qr, _ = run("qr")
    assert by_gram.numel() > 2 * kernels.CPU_BLOCK
    assert gram_opt.stats.qr_fallbacks == 0
    assert torch.allclose(by_gram, by_qr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["gram", "qr"])
def test_nearly_collinear_history_keeps_parameters_finite(solver):
    """A nearly constant gradient makes every dR column tiny and nearly parallel."""
    w = torch.ones(50, dtype=torch.float32, requires_grad=True)
    direction = torch.linspace(1, 2, 50)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.1), history=5, safeguard="none", solver=solver)
    for _ in range(20):
        opt.zero_grad()
        (direction @ w + 1e-7 * (w**2).sum()).backward()
        opt.step()
        assert torch.isfinite(w).all()
    assert opt.stats.aa_attempts == 19
    assert opt.stats.last_condition > 1e3  # the system really was ill-conditioned


def test_exactly_zero_history_is_rejected_not_nan():
    """A constant residual gives dR = 0: g is the minimum-norm 0 and w stays finite."""
    w = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.5), history=3, safeguard="none")
    for _ in range(6):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    assert torch.allclose(w.detach(), torch.full((10,), -3.0, dtype=torch.float64))
    assert opt.stats.last_g_norm == 0.0


def test_incremental_gram_equals_recomputed_after_ring_wraps():
    problem = LogisticProblem(seed=4)
    _, opt = run_wrapper(problem, 17, history=4, store_every=1)
    history = opt._history
    assert len(history) == 4 and opt.stats.steps > 4 + 4  # wrapped at least once
    dR = history.dR[:4]
    np.testing.assert_allclose(history.gram[:4, :4].numpy(), (dR @ dR.T).numpy(), rtol=1e-12)


def test_blocked_dot_products_are_float64_accurate_and_thread_independent(cpu_passes):
    gen = torch.Generator().manual_seed(0)
    n = 5 * kernels.CPU_BLOCK + 123
    rows = torch.randn(6, n, generator=gen) * 1e-3 + 2e-4
    vectors = [torch.randn(n, generator=gen), rows[2]]
    exact = rows.double() @ torch.stack(vectors, dim=1).double()
    scale = rows.double().norm(dim=1)[:, None] * torch.stack(vectors).double().norm(dim=1)[None, :]
    result = kernels.row_dots(rows, vectors)
    assert float(((result - exact).abs() / scale).max()) < 1e-8  # float32 unit roundoff is 6e-8
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernels.row_dots(rows, vectors)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(result, single)


def test_dots_and_square_in_one_pass_match_separate_exact_products(cpu_passes):
    gen = torch.Generator().manual_seed(5)
    n = 4 * kernels.CPU_BLOCK + 77
    rows = torch.randn(5, n, generator=gen) * 1e-3 + 3e-4
    vector = torch.randn(n, generator=gen)
    dots, square = kernels.row_dots_and_square(rows, vector, 3)
    exact = rows.double() @ vector.double()
    assert float(((dots - exact).abs() / (rows.double().norm(dim=1) * vector.double().norm())).max()) < 1e-8
    assert float(square) == pytest.approx(float(rows[3].double() @ rows[3].double()), rel=1e-12)
    assert torch.equal(dots, kernels.row_dots(rows, [vector])[:, 0])


def test_mix_and_statistics_kernels_match_dense_formulas(cpu_passes):
    gen = torch.Generator().manual_seed(1)
    n = 3 * kernels.CPU_BLOCK + 7
    rows, base, shift = torch.randn(4, n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    g = torch.randn(4, dtype=torch.float64, generator=gen)
    out = torch.empty(n)
    total = kernels.mix(out, base, rows, g, shift, -0.25)
    expected = base - 0.25 * shift - rows.T @ g.float()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    # The numba loop sums in float64; the torch version sums each block in float32.
    assert float(total) == pytest.approx(float(out.double().sum()), rel=1e-9 if cpu_passes == "numba" else 1e-5)
    for poison in (math.nan, math.inf, -math.inf):
        bad = base.clone()
        bad[n - 1] = poison
        assert not math.isfinite(float(kernels.mix(out, bad, rows, g)))
    # Finite entries whose sum overflows (float32 blocks; float64 parameters, where even
    # a float64 sum can) are finite: the check must not reject them.
    huge = torch.full((n,), 3e38)
    assert math.isfinite(float(kernels.mix(out, huge, rows, torch.zeros_like(g))))
    huge64 = torch.full((n,), 1e308, dtype=torch.float64)
    out64 = torch.empty(n, dtype=torch.float64)
    assert math.isfinite(float(kernels.mix(out64, huge64, rows.double(), torch.zeros_like(g))))
    huge64[n - 1] = math.inf
    assert not math.isfinite(float(kernels.mix(out64, huge64, rows.double(), torch.zeros_like(g))))

    buffer = torch.randn(5, n, generator=gen)
    std, mean = kernels.max_entry_spread(buffer, correction=0)
    assert std == pytest.approx(float(buffer.var(dim=0, correction=0).max().sqrt()), rel=1e-5)
    assert mean == pytest.approx(float(buffer.mean(dim=0).max()), rel=1e-5)
    assert torch.allclose(kernels.row_mean(buffer, torch.empty(n)), buffer.mean(dim=0), atol=1e-6)


def test_numba_loops_and_torch_operations_agree(monkeypatch):
    """Both implementations of the passes, on float32 and float64 rows, several blocks."""
    if kernels._compiled is None:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(6)
    n = 3 * kernels.CPU_BLOCK + 5
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(7, n, generator=gen, dtype=dtype)  # 7 rows: a group of four and three more
        vector, base, shift = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(3))
        g = torch.randn(7, dtype=torch.float64, generator=gen)
        results = {}
        for passes in ("numba", "torch"):
            monkeypatch.setenv("AADL_CPU_KERNELS", passes)
            out = torch.empty(n, dtype=dtype)
            dots, square = kernels.row_dots_and_square(rows, vector, 5)
            total = kernels.mix(out, base, rows, g, shift, 0.3)
            results[passes] = (dots, square, out, total)
        (d1, s1, o1, t1), (d2, s2, o2, t2) = results["numba"], results["torch"]
        assert torch.allclose(d1, d2, rtol=1e-12, atol=1e-12 * float(d2.abs().max()))
        assert float(s1) == pytest.approx(float(s2), rel=1e-13)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(o1, o2, rtol=tolerance, atol=tolerance)
        assert float(t1) == pytest.approx(float(t2), rel=1e-4)


def test_numba_loops_are_the_ones_used_when_installed(monkeypatch):
    if kernels._compiled is None:
        pytest.skip("numba is not installed")
    calls = []
    real = kernels._compiled.block_dots
    monkeypatch.setattr(kernels._compiled, "block_dots", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("AADL_CPU_KERNELS", raising=False)
    kernels.row_dots(torch.randn(3, 1000), [torch.randn(1000)])
    assert calls
    calls.clear()
    monkeypatch.setenv("AADL_CPU_KERNELS", "torch")
    kernels.row_dots(torch.randn(3, 1000), [torch.randn(1000)])
    assert not calls
    # Other dtypes go to the torch operations even where the loops are enabled.
    monkeypatch.delenv("AADL_CPU_KERNELS")
    rows, vector = torch.randn(3, 1000, dtype=torch.float16), torch.randn(1000, dtype=torch.float16)
    dots = kernels.row_dots(rows, [vector])[:, 0]
    assert not calls
    assert torch.allclose(dots, rows.double() @ vector.double(), rtol=1e-12, atol=1e-12)


def test_compiled_loops_fall_back_to_no_disk_cache(monkeypatch):
    """Where numba finds no writable cache directory, the loops compile per process
    instead of failing the import of the library."""
    if kernels._compiled is None:
        pytest.skip("numba is not installed")
    from aadl import cpu_kernels

    real_njit = cpu_kernels.njit

    def no_cache_locator(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real_njit(**options)

    monkeypatch.setattr(cpu_kernels, "njit", no_cache_locator)

    def double(x):
        return 2.0 * x

    assert cpu_kernels._compiled(double)(1.5) == 3.0


def test_cpu_kernels_setting_is_checked(monkeypatch):
    monkeypatch.setenv("AADL_CPU_KERNELS", "fortran")
    with pytest.raises(ValueError, match="AADL_CPU_KERNELS"):
        kernels.compiled_loops_enabled()
    monkeypatch.setattr(kernels, "_compiled", None)
    monkeypatch.setenv("AADL_CPU_KERNELS", "numba")
    with pytest.raises(ImportError, match="numba is not installed"):
        kernels.compiled_loops_enabled()
    monkeypatch.setenv("AADL_CPU_KERNELS", "auto")
    assert not kernels.compiled_loops_enabled()


def test_streaming_r_factor_reproduces_the_gram_matrix():
    gen = torch.Generator().manual_seed(2)
    n = 2 * kernels.CPU_BLOCK + 11
    rows, vector = torch.randn(3, n, generator=gen), torch.randn(n, generator=gen)
    r = kernels.streaming_r_factor(rows, vector)
    A = torch.cat([rows.T, vector[:, None]], dim=1).double()
    assert torch.allclose(r.T @ r, A.T @ A, rtol=1e-10)


def _row_dots_in_forked_child(rows, vector):
    # What torch asks of a forked child once the parent used its thread pools (DataLoader
    # workers do the same): set the thread count before starting threads of its own.
    torch.set_num_threads(1)
    kernels.BLOCK_WORKERS = 2  # still split the blocks over threads: a pool of the child's own
    return kernels.row_dots(rows, [vector])


def test_block_threads_survive_a_fork():
    """A child forked after the block threads started must get a pool of its own (the
    parent's threads do not exist in it) and the same result."""
    import multiprocessing

    gen = torch.Generator().manual_seed(3)
    rows, vector = torch.randn(2, 4 * kernels.CPU_BLOCK, generator=gen), torch.randn(4 * kernels.CPU_BLOCK, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(1 << 20).sum()  # the parent's torch thread pools are in use
        expected = kernels.row_dots(rows, [vector])  # starts the block threads in this process
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(_row_dots_in_forked_child, (rows, vector)).get(timeout=60)
    assert torch.equal(got, expected)


def test_block_workers_run_single_threaded_and_leave_the_caller_alone():
    """Each block worker is one core's thread: torch ops in it must not start parallel
    regions of their own (two workers x two OpenMP threads made the QR blocks 6x slower),
    and pinning them must not change the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = kernels._executor(2)
        assert pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _ill_conditioned_history(condition_of_gram, residual, seed, n=300, h=8):
    """Rows of dR (h, n) with cond(dR^T dR) = ``condition_of_gram``, an r whose least-squares
    residual is ``residual`` times |dR g|, and the Gram matrix and rhs as the history keeps
    them (exact-product float64 sums)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, h)))
    rotation, _ = np.linalg.qr(rng.standard_normal((h, h)))
    singular = np.logspace(0, -0.5 * math.log10(condition_of_gram), h)
    dR = (basis * singular) @ rotation.T * 1e-3
    fitted = dR @ rng.standard_normal(h)
    noise = rng.standard_normal(n)
    noise -= basis @ (basis.T @ noise)
    r = fitted + residual * np.linalg.norm(fitted) * noise / np.linalg.norm(noise)
    rows, rhs_vector = torch.tensor(dR.T.copy()), torch.tensor(r)
    gram = kernels.row_dots(rows, [rows[j] for j in range(h)])
    return rows, rhs_vector, gram, kernels.row_dots(rows, [rhs_vector])[:, 0]


@pytest.mark.parametrize("condition_of_gram", [1e2, 1e4, 1e6, 1e7, 1e8, 1e9, 1e10, 1e12])
def test_gram_answers_only_within_its_error_bound_of_qr(condition_of_gram):
    """Where the normal equations answer, their coefficients agree with QR's to
    GRAM_ERROR_BOUND (relative); past it they refuse and the wrapper uses QR. The estimate
    u cond(G) tracks the measured difference (within a small factor either way)."""
    for residual in (0.0, 1e-6, 1e-2, 1.0):
        for seed in range(3):
            rows, r, gram, rhs = _ill_conditioned_history(condition_of_gram, residual, seed)
            by_qr = solve_r_factor(kernels.streaming_r_factor(rows, r), 0.0).coefficients.numpy()
            by_gram = solve_normal_equations(gram, rhs, 0.0)
            if by_gram is None:
                assert gram_error_estimate(condition_of_gram) > GRAM_ERROR_BOUND / 2
                continue
            difference = np.linalg.norm(by_gram.coefficients.numpy() - by_qr) / np.linalg.norm(by_qr)
            assert difference <= GRAM_ERROR_BOUND
            assert difference <= 3 * gram_error_estimate(by_gram.condition**2)
    assert (solve_normal_equations(gram, rhs, 0.0) is None) == (condition_of_gram > GRAM_MAX_CONDITION)


def test_the_gram_switch_is_near_a_condition_of_ten_million():
    assert 5e6 < GRAM_MAX_CONDITION < 1.3e7  # the normal equations answer up to cond(G) ~ 1e7
    assert GRAM_ERROR_BOUND == pytest.approx(gram_error_estimate(GRAM_MAX_CONDITION))
