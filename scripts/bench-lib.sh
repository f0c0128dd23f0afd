# Shell helpers shared by scripts/bench and scripts/bench-instructions (sourced, not run).

free_port() { # below the ephemeral range, and used by no socket in any state
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    if ! ss -tanH "sport = :$p" | grep -q .; then echo "$p"; return; fi
  done
}

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; } # N random bytes as hex

wait_http() { # URL, what, [seconds to wait, default 30]
  local tries=$(( ${3:-30} * 10 ))
  for _ in $(seq 1 "$tries"); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up ($1)" >&2
  return 1
}
