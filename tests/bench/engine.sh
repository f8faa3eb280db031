#!/usr/bin/env bash
# Engine speed: prefill and decode tok/s and peak RSS of `needle generate` at 512, 2K and 8K
# context tokens of the default document, for `--selector full` and `--selector retrieval`.
# Usage: tests/bench/engine.sh [path/to/needle] [max_tokens]   (one table row per run, TSV)
set -euo pipefail
BIN=${1:-target/release/needle}
MAX=${2:-32}
DOC=${NEEDLE_DOC:-$HOME/.cache/needle/data/king-james-bible.txt}
printf 'context\tselector\tprefill_tok_s\tdecode_tok_s\tpeak_rss_mb\n'
for ctx in 512 2048 8192; do
  for sel in full retrieval; do
    out=$(mktemp)
    /usr/bin/time -f '%M' -o "$out.rss" "$BIN" generate --model default --prompt-file "$DOC" \
      --context-tokens "$ctx" --selector "$sel" --max-tokens "$MAX" --json >"$out" 2>/dev/null
    python3 - "$out" "$ctx" "$sel" "$(cat "$out.rss")" <<'PY'
import json, sys
path, ctx, sel, rss = sys.argv[1:5]
text = open(path).read()
j = json.loads(text[text.index('{'):])
def find(d, *keys):
    for k in keys:
        if k in d: return d[k]
    for v in d.values():
        if isinstance(v, dict):
            r = find(v, *keys)
            if r is not None: return r
    return None
pre = find(j, 'prefill_tokens_per_second', 'prefill_tps')
dec = find(j, 'decode_tokens_per_second', 'decode_tps')
if pre is None:
    pre = find(j, 'prompt_tokens') / find(j, 'prefill_secs')
    dec = (find(j, 'steps') or len(find(j, 'tokens'))) / find(j, 'decode_secs')
print(f"{ctx}\t{sel}\t{pre:.1f}\t{dec:.1f}\t{int(rss)/1024:.0f}")
PY
    rm -f "$out" "$out.rss"
  done
done
