# On the Hopper host, after `bash .gpu/a/stash.sh` in an earlier upload: `source benchmarks/gpu_setup.sh`.
# Installs the GPU wheels (FA4, CUTLASS DSL; ../shared/gpu/install.sh) and attnlang itself, editable, into the
# host's Python: the repository maps grammar/ and backends/ to attnlang.grammar / attnlang.backends, which only an
# install (not PYTHONPATH) provides.
source .gpu/b/install.sh || return 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
python3 -c "import attnlang.backends.fa4, attnlang.grammar; print('attnlang ok')"
