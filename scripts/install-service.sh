#!/usr/bin/env bash
# Install rtnode as a systemd service (Debian, Python 3.11+; run as root):
#   rtnode's wheel (built from this clone, or --wheel PATH) in its own environment /opt/rtnode,
#   the system user rtnode, the configuration /etc/rtnode/node.toml (from `rtnode config example`,
#   data_dir = /var/lib/rtnode), the data directory /var/lib/rtnode (0700, rtnode's) and the units of
#   deploy/ in /etc/systemd/system. Idempotent: an existing configuration or data is never
#   overwritten; a second run with the same wheel changes nothing. It enables nothing: it prints the
#   commands that do.
#
# --prefix DIR   install under DIR instead of / (DIR/opt/rtnode, DIR/etc/rtnode, ...; the units name
#                those paths, and systemd's StateDirectory=, which is always under /var/lib, is dropped)
# --wheel PATH   install this wheel instead of building one from the clone
# --pip-args 'ARGS'  more arguments for every pip install (e.g. --no-index --find-links DIR)
# --no-user      make no user and change no owner (the files stay the invoking user's): for a staging
#                root, or a user rtnode made otherwise
# $PYTHON        the interpreter the environment is made from (default python3)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
say() { echo "install-service: $*"; }
fail() { echo "install-service: $*" >&2; exit 2; }

prefix=""
wheel=""
pip_args=()
make_user=1
while (($#)); do
    case "$1" in
        --prefix) [ $# -ge 2 ] || fail "--prefix needs a folder"; prefix="$(realpath -m "$2")"; shift 2 ;;
        --wheel) [ $# -ge 2 ] || fail "--wheel needs a file"; wheel="$(realpath "$2")"; shift 2 ;;
        --pip-args) [ $# -ge 2 ] || fail "--pip-args needs its arguments"; read -ra pip_args <<<"$2"; shift 2 ;;
        --no-user) make_user=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) fail "unknown argument $1 (see $0 --help)" ;;
    esac
done
[ "$prefix" = / ] && prefix=""
[ -z "$wheel" ] || [ -f "$wheel" ] || fail "no wheel at $wheel"
if ((make_user)) && [ "$(id -u)" -ne 0 ]; then
    fail "run as root (it makes the user rtnode and gives it the data directory), or give --no-user"
fi

user=rtnode
opt_dir="$prefix/opt/rtnode"
etc_dir="$prefix/etc/rtnode"
state_dir="$prefix/var/lib/rtnode"
unit_dir="$prefix/etc/systemd/system"
config="$etc_dir/node.toml"
python="$opt_dir/bin/python"
pip=("$python" -m pip --disable-pip-version-check -q)

# The environment, torch (the CPU wheel: any other spec would pull a multi-GB CUDA build; GPU users
# replace it, see README.md "Using an NVIDIA GPU"), then rtnode. A wheel installed before is not
# installed again; another one is, even at an unchanged version number.
if [ ! -x "$python" ]; then
    "${PYTHON:-python3}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "rtnode needs Python 3.11 or newer"
    say "making the environment $opt_dir"
    "${PYTHON:-python3}" -m venv "$opt_dir"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$wheel" ]; then
    say "building rtnode's wheel from $repo"
    "${pip[@]}" wheel --no-deps -w "$work" "$repo"
    wheel="$(echo "$work"/rtnode-*.whl)"
fi
"$python" -c "import torch" 2>/dev/null || "${pip[@]}" install "${pip_args[@]}" torch==2.13.0
installed_wheel="$opt_dir/installed-wheel.sha256"
wheel_digest="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [ "$(cat "$installed_wheel" 2>/dev/null)" = "$wheel_digest" ]; then
    say "$(basename "$wheel") is installed already"
else
    say "installing $(basename "$wheel") into $opt_dir"
    "${pip[@]}" install "${pip_args[@]}" "$wheel"
    "${pip[@]}" install "${pip_args[@]}" --force-reinstall --no-deps "$wheel"
    echo "$wheel_digest" >"$installed_wheel"
fi

# The user, and who owns what: the configuration root's and readable by the group rtnode (it may
# hold destination passwords), the data directory rtnode's alone.
config_owner=()
data_owner=()
if ((make_user)); then
    if ! getent passwd "$user" >/dev/null; then
        say "making the system user $user"
        useradd --system --user-group --home-dir "$state_dir" --no-create-home --shell /usr/sbin/nologin \
            --comment "rtnode DICOM node" "$user"
    fi
    config_owner=(-o root -g "$user")
    data_owner=(-o "$user" -g "$user")
fi
install -d -m 0750 "${config_owner[@]}" "$etc_dir"
install -d -m 0700 "${data_owner[@]}" "$state_dir"
if [ -e "$config" ]; then
    say "$config exists: kept as it is"
else
    "$opt_dir/bin/rtnode" config example | sed "s|^data_dir = \"data\"|data_dir = \"$state_dir\"|" >"$work/node.toml"
    grep -q "^data_dir = \"$state_dir\"" "$work/node.toml" || fail "the example configuration names no data_dir = \"data\" to replace"
    install -m 0640 "${config_owner[@]}" "$work/node.toml" "$config"
    say "wrote $config (data_dir = $state_dir): set its allowed callers and destinations"
fi

# The units, naming this installation's paths; one that is already so is left alone.
install -d -m 0755 "$unit_dir"
for unit in "$repo"/deploy/*.service; do
    rendered="$work/$(basename "$unit")"
    sed -e "s|/opt/rtnode|$opt_dir|g; s|/etc/rtnode|$etc_dir|g; s|/var/lib/rtnode|$state_dir|g" "$unit" >"$rendered"
    [ -z "$prefix" ] || sed -i '/^StateDirectory/d' "$rendered"
    target="$unit_dir/$(basename "$unit")"
    if cmp -s "$rendered" "$target"; then
        say "$target is up to date"
    else
        install -m 0644 "$rendered" "$target"
        say "installed $target"
    fi
done

cat <<EOF
install-service: done. Next, as root:
  systemctl daemon-reload
  systemctl enable --now rtnode
  sudo -u $user $opt_dir/bin/rtnode --config $config user add admin --role admin
  journalctl -u rtnode -f
Extra workers, one per GPU: systemctl enable --now rtnode-worker@cuda:0 rtnode-worker@cuda:1
Run rtnode commands as $user (sudo -u $user $opt_dir/bin/rtnode --config $config jobs): the files they make must stay $user's.
EOF
