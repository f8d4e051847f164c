#!/bin/bash
# Passes when the report built by remote actions has the expected lines.
set -euo pipefail
report="$1"
grep -qx 'hello from a remote worker' "$report"
grep -qx 'ACTIONS THAT RUN ELSEWHERE' "$report"
grep -qx './nested/deeper/tool.sh' "$report"
echo "report_test: ok"
