#!/usr/bin/env bash
# Starts Ray on one moeserve node; cluster/cluster.yaml and cluster/local.yaml run it after
# `ray stop`. Usage: start-node.sh head | start-node.sh worker
#
# Reads ~/moeserve.env (synced by `ray up` from ~/.moeserve/cluster.env on your machine):
#   RAY_AUTH_TOKEN=...             the same token on every node (token auth is on)
#   MOESERVE_REDIS_PASSWORD=...    password of the head's redis-server (when no URL is given)
#   MOESERVE_REDIS_URL=...         optional: a managed Redis (rediss://:PASSWORD@host:6380/0);
#                                  unset, the head runs redis-server on port 6380 for all nodes
#   MOESERVE_API_KEY=...           optional: API key(s) the OpenAI routes require
# On the `local` provider, /etc/moeserve/ray-resources.json on each host names its custom
# resources ({"router": 1} or {"expert": 4}); cloud node types get theirs from cluster.yaml.
#
# Every variable exported here reaches the Serve replicas and expert shards on this node:
# they are children of this node's raylet.
set -euo pipefail

role=${1:?usage: start-node.sh head|worker}
env_file=${MOESERVE_ENV_FILE:-$HOME/moeserve.env}
if [[ -f $env_file ]]; then
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
fi
export RAY_AUTH_MODE=token
redis_port=${MOESERVE_REDIS_PORT:-6380}
common=(--metrics-export-port=8080 --disable-usage-stats)
resources_file=/etc/moeserve/ray-resources.json
if [[ -f $resources_file ]]; then
  common+=("--resources=$(cat "$resources_file")")
fi

case $role in
  head)
    if [[ -z ${MOESERVE_REDIS_URL:-} ]]; then
      : "${MOESERVE_REDIS_PASSWORD:?set MOESERVE_REDIS_PASSWORD or MOESERVE_REDIS_URL}"
      # Shared prefix cache for every router: LRU, no persistence (a cache, not a store).
      # Left running across `ray up` restarts (its blocks stay valid: keys carry the digest).
      REDISCLI_AUTH=$MOESERVE_REDIS_PASSWORD redis-cli -p "$redis_port" ping >/dev/null 2>&1 ||
        redis-server --port "$redis_port" --bind 0.0.0.0 --protected-mode yes \
          --requirepass "$MOESERVE_REDIS_PASSWORD" \
          --maxmemory "${MOESERVE_REDIS_MAXMEMORY:-8gb}" --maxmemory-policy allkeys-lru \
          --save "" --appendonly no --daemonize yes
      head_ip=$(hostname -I | awk '{print $1}')
      export MOESERVE_REDIS_URL="redis://:${MOESERVE_REDIS_PASSWORD}@${head_ip}:${redis_port}/0"
    fi
    ulimit -n 65536 || true
    exec ray start --head --port=6379 --object-manager-port=8076 \
      --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --dashboard-host=0.0.0.0 \
      "${common[@]}"
    ;;
  worker)
    : "${RAY_HEAD_IP:?RAY_HEAD_IP is set by ray up}"
    if [[ -z ${MOESERVE_REDIS_URL:-} ]]; then
      : "${MOESERVE_REDIS_PASSWORD:?set MOESERVE_REDIS_PASSWORD or MOESERVE_REDIS_URL}"
      export MOESERVE_REDIS_URL="redis://:${MOESERVE_REDIS_PASSWORD}@${RAY_HEAD_IP}:${redis_port}/0"
    fi
    ulimit -n 65536 || true
    exec ray start --address="${RAY_HEAD_IP}:6379" --object-manager-port=8076 "${common[@]}"
    ;;
  *)
    echo "usage: start-node.sh head|worker" >&2
    exit 2
    ;;
esac
