#!/usr/bin/env bash
# Two ssh "hosts" on this machine for the multi-host launcher tests: sshd listening on 127.0.0.2 and
# 127.0.0.3 only, with a throwaway host key and client key in DIR. The user's ~/.ssh is not touched:
# DIR/bin/ssh runs ssh with DIR/ssh_config, and the tests put DIR/bin first on PATH, which is where
# DeepSpeed's runner (its ssh check) and pdsh find ssh.
#   bash tests/loopback_ssh.sh start DIR   # needs sshd (openssh-server) and ssh-keygen; run as root, or as
#                                          # the only user that will log in
#   bash tests/loopback_ssh.sh stop DIR
# The tests use DIR when LLMTRAIN_TEST_SSH_DIR names it (.ci/run does this), else they start their own.
set -euo pipefail
command=${1:?start or stop}
dir=${2:?a directory for the keys and configs}

case "$command" in
  start)
    sshd=$(command -v sshd || echo /usr/sbin/sshd)
    [[ -x "$sshd" ]] || { echo "loopback_ssh: sshd not found (apt-get install openssh-server)" >&2; exit 1; }
    mkdir -p "$dir/bin"
    chmod 700 "$dir"
    user=$(id -un)
    # A free port on the test addresses, so a real sshd on port 22 is never in the way.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.2", 0)); print(s.getsockname()[1])')
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
    cp "$dir/client_key.pub" "$dir/authorized_keys"
    cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.2:$port
ListenAddress 127.0.0.3:$port
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
AllowUsers $user
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
LogLevel ERROR
EOF
    cat >"$dir/ssh_config" <<EOF
Host 127.0.0.2 127.0.0.3
  Port $port
  User $user
  IdentityFile $dir/client_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$dir/ssh_config" >"$dir/bin/ssh"
    chmod 755 "$dir/bin/ssh"
    if [[ $(id -u) == 0 ]]; then mkdir -p /run/sshd; fi  # sshd's privilege separation directory
    "$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log"
    for _ in $(seq 50); do
      if "$dir/bin/ssh" 127.0.0.2 true 2>/dev/null && "$dir/bin/ssh" 127.0.0.3 true 2>/dev/null; then exit 0; fi
      sleep 0.1
    done
    echo "loopback_ssh: sshd did not accept logins on 127.0.0.2/127.0.0.3:$port (see $dir/sshd.log)" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$dir/sshd.pid" ]]; then kill "$(cat "$dir/sshd.pid")" 2>/dev/null || true; fi
    ;;
  *)
    echo "loopback_ssh: unknown command $command (start or stop)" >&2
    exit 2
    ;;
esac
