#!/bin/sh
# Entry point of the varlide worker image (infra/worker.Dockerfile).
#
# Before the container's command runs, the weights cache is filled from the mirror
# (`varlide weights sync $VARLIDE_WEIGHTS_MIRROR`), so no worker ever downloads a weight
# file in the middle of a run (README "Weights on machines without internet").
#
#   VARLIDE_WEIGHTS_MIRROR  the mirror written by `varlide weights mirror URI` (unset: no sync)
#   WEIGHTS_SYNC            auto (default): a failed sync is a warning, the command still
#                           starts (a run that needs a missing file then fails with a message
#                           naming it); required: a failed sync stops the container; off: skip
set -eu

mode="${WEIGHTS_SYNC:-auto}"
case "$mode" in
  auto|required|off) ;;
  *) echo "varlide-entrypoint: WEIGHTS_SYNC must be auto, required or off (got '$mode')" >&2
     exit 2 ;;
esac

if [ -n "${VARLIDE_WEIGHTS_MIRROR:-}" ] && [ "$mode" != "off" ]; then
  echo "varlide-entrypoint: syncing weights from $VARLIDE_WEIGHTS_MIRROR"
  if varlide weights sync "$VARLIDE_WEIGHTS_MIRROR"; then
    :
  elif [ "$mode" = "required" ]; then
    echo "varlide-entrypoint: weights sync from $VARLIDE_WEIGHTS_MIRROR failed" \
         "(WEIGHTS_SYNC=required); fill the mirror with \`varlide weights pull\` and" \
         "\`varlide weights mirror $VARLIDE_WEIGHTS_MIRROR\` on a machine with internet" >&2
    exit 1
  else
    echo "varlide-entrypoint: warning: weights sync from $VARLIDE_WEIGHTS_MIRROR failed;" \
         "starting anyway (runs that need a missing file will name it)" >&2
  fi
fi

exec "$@"
