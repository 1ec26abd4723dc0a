"""pytest_test: one Bazel py_test per pytest file, run through tests/pytest_main.py."""

def pytest_test(name, src, deps = [], data = [], tags = [], size = "medium", **kwargs):
    native.py_test(
        name = name,
        srcs = ["pytest_main.py", src],
        main = "pytest_main.py",
        args = ["$(location %s)" % src],
        data = ["conftest.py"] + data,
        deps = deps,
        tags = tags,
        size = size,
        **kwargs
    )
