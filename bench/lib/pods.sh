# Shared by bench scripts that measure lab pods (sourced; needs W, RR and SECS set):
#   gbps CLIENT SERVER IP   single-stream TCP Gbit/s (iperf3)
#   rr   CLIENT SERVER IP   TCP request/response rate (crates/weft/examples/tcp_rr.rs)
gbps() {
  $W lab exec "$2" -- iperf3 -s -D -1 >/dev/null 2>&1 || true
  sleep 0.3
  $W lab exec "$1" -- iperf3 -c "$3" -t "$SECS" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))'
}
rr() {
  $W lab exec "$2" -- "$RR" server 7777 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  $W lab exec "$1" -- "$RR" client "$3" 7777 "$SECS"
  kill $srv 2>/dev/null || true
  pkill -f "tcp_rr server 7777" 2>/dev/null || true
}
