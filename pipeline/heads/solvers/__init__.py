"""The numerical cores under the heads: L-BFGS (lbfgs) and the softmax objective, in memory and streamed (softmax)."""
