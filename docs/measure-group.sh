#!/bin/bash
# Group end to end on the default model: create, two joins (mDNS and --master), two workers
# holding no model, time to serving, weight transfer figures, members listing, chat answer.
set -u
cd "$(dirname "$0")/.."
M=.venv/bin/molink
D=$(mktemp -d)
GP=${GP:-7741}; AP=${AP:-8041}
EXTRA_W1=${EXTRA_W1:-}
$M group create --model default --host 127.0.0.1 --port $GP --api-port $AP --data-dir $D/master --min-workers 2 --name meas > $D/master.log 2>&1 &
MP=$!
for i in $(seq 1 240); do grep -q "Pairing code:" $D/master.log && break; sleep 0.5; done
CODE=$(grep "Pairing code:" $D/master.log | head -1 | awk '{print $NF}')
s=$(date +%s.%N); $M join $CODE --data-dir $D/w1 --name alice; e=$(date +%s.%N)
echo "join by mDNS: $(echo "$e - $s" | bc) s"
CODE2=$($M group code --data-dir $D/master | head -1 | awk '{print $NF}')
s=$(date +%s.%N); $M join $CODE2 --master 127.0.0.1:$GP --data-dir $D/w2 --name bob; e=$(date +%s.%N)
echo "join --master: $(echo "$e - $s" | bc) s"
s=$(date +%s.%N)
$M worker --data-dir $D/w1 --device cpu --threads 1 $EXTRA_W1 > $D/w1.log 2>&1 &
W1=$!
$M worker --data-dir $D/w2 --device cpu --threads 1 > $D/w2.log 2>&1 &
W2=$!
for i in $(seq 1 600); do curl -sf http://127.0.0.1:$AP/health >/dev/null && break; sleep 0.5; done
e=$(date +%s.%N)
echo "workers start -> serving: $(echo "$e - $s" | bc) s"
grep -h "weights received\|fetching" $D/w1.log $D/w2.log
$M group members --data-dir $D/master
curl -s http://127.0.0.1:$AP/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"What is the capital of France? One sentence."}],"max_tokens":20,"temperature":0}' | python3 -c 'import json,sys; print("chat:", json.load(sys.stdin)["choices"][0]["message"]["content"])'
$M probe --device cpu --data-dir $D/w1 | grep -i "link\|rtt\|mbit" 
kill $W1 $W2; sleep 1; kill $MP; wait
echo "dir $D"
