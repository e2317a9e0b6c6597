# On the Hopper host, after `bash .gpu/a/stash.sh` in an earlier upload: `source benchmarks/gpu_setup.sh`.
# Installs the GPU wheels (FA4, CUTLASS DSL; ../shared/gpu/install.sh) and attnlang itself into the host's Python:
# the repository maps grammar/ and backends/ to attnlang.grammar / attnlang.backends, which only an install (not
# PYTHONPATH) provides. A regular install (the host's setuptools maps editable subpackages wrongly), so run tests
# from tests/ (`cd tests && python3 -m pytest -m gpu .`) and scripts as `python3 benchmarks/x.py`, where the
# checkout's attnlang/ does not shadow the installed one.
source .gpu/b/install.sh || return 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || return 1
(cd /tmp && python3 -c "import attnlang.backends.fa4, attnlang.parse as p; p.parse('q_idx >= kv_idx'); print('attnlang ok', attnlang.__file__)")
