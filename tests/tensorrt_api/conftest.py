import pytest

from tests.tensorrt_api.bindings import VERSIONS, install


@pytest.fixture(scope="session", params=sorted(VERSIONS), ids=lambda v: f"trt{v}")
def bindings(request):
    return install(request.param)
