"""The Python snippets of seed 000_8b8cfb872ca5deb8.txt (UDR comparison), verbatim, shared by the tests
that run them on real audit JSON."""

# Steps 2 and 4 of the seed, verbatim.
SEED_STEP_2 = '''import json

# Load results
with open('conservative_audit.json') as f:
    conservative = json.load(f)

with open('aggressive_audit.json') as f:
    aggressive = json.load(f)

# Compare summary metrics
print("=== UDR Comparison ===")
print(f"Conservative UDR median: {conservative['udr_median']:.3f}")
print(f"Aggressive UDR median:   {aggressive['udr_median']:.3f}")

print(f"Conservative layers > 0.3 UDR: {conservative['fraction_udr_gt_0_3']:.1%}")
print(f"Aggressive layers > 0.3 UDR:   {aggressive['fraction_udr_gt_0_3']:.1%}")
'''
SEED_STEP_4 = '''# Find modules with highest UDR differences
conservative_layers = {l['name']: l.get('udr', 0) for l in conservative['layers']}
aggressive_layers = {l['name']: l.get('udr', 0) for l in aggressive['layers']}

# Compare per module
print("\\n=== Biggest UDR Differences ===")
for name in conservative_layers:
    if name in aggressive_layers:
        diff = aggressive_layers[name] - conservative_layers[name]
        print(f"{name}: +{diff:.3f}")
'''
