#!/bin/sh
# Trims the slim image's virtual environment (deploy/slim.Dockerfile): the parts of pyarrow
# it never loads, and the symbol tables of its native libraries. Usage: slim-prune.sh VENV
set -eu
site=$(echo "$1"/lib/python3*/site-packages)
arrow="$site/pyarrow"
# `embed` reads and writes local Parquet, CSV and JSON files: pyarrow's Flight (RPC) and S3
# libraries are never loaded, nor its C++ headers, Cython sources and tests (63 of 170 MB).
rm -rf "$arrow/include" "$arrow/src" "$arrow/tests" \
    "$arrow"/libarrow_flight.so* "$arrow"/libarrow_python_flight.so* "$arrow"/_flight.*.so \
    "$arrow"/libarrow_s3.so* "$arrow"/_s3fs.*.so "$arrow"/_pyarrow_cpp_tests.*.so
find "$arrow" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \) -delete
# Debug and local symbols only (~48 MB); what a library exports stays. The wheels' bundled
# *.libs folders are left as they are: patchelf rewrote those, and strip can break such files.
find "$site" -name '*.so*' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} +
