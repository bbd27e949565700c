/* metrics.h: the benchmark metrics of tspeft eval (GLUE's and lm-evaluation-harness' definitions).
 *
 *   double acc = tk_metric_accuracy(pred, gold, n);
 *   double mcc = tk_metric_mcc(pred, gold, n);             // CoLA
 *   double f1 = tk_metric_f1(pred, gold, n);               // MRPC, QQP (positive class 1)
 *   double r = tk_metric_pearson(x, y, n);                 // STS-B
 *   double rho;
 *   if (tk_metric_spearman(&rho, x, y, n, &err) != 0) ... // ties get their average rank
 *
 * Definitions (scikit-learn's / scipy's, which GLUE uses):
 *   accuracy  mean of [pred == gold]
 *   F1        binary, positive label 1: 2 TP / (2 TP + FP + FN); 0 when TP + FP + FN = 0
 *   MCC       binary: (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0
 *             (labels other than 0/1 count as their truth value)
 *   Pearson   sum (x-mx)(y-my) / sqrt(sum (x-mx)^2 sum (y-my)^2); NaN when either side is constant
 *   Spearman  Pearson of the ranks, ties sharing the mean of their ranks (scipy's "average")
 * Every metric of n = 0 items is NaN. Computed in double with two-pass means.
 *
 * Ownership: inputs are borrowed. Failure: only tk_metric_spearman allocates (-1 with err when out
 * of memory).
 */
#ifndef TK_EVAL_METRICS_H
#define TK_EVAL_METRICS_H

#include "../common.h"

#include <stddef.h>

double tk_metric_accuracy(const int *pred, const int *gold, size_t n); /* pred, gold [n] */
double tk_metric_f1(const int *pred, const int *gold, size_t n);       /* pred, gold [n] in {0,1} */
double tk_metric_mcc(const int *pred, const int *gold, size_t n);      /* pred, gold [n] in {0,1} */
double tk_metric_pearson(const double *x, const double *y, size_t n);  /* x, y [n] */
/* *out receives Spearman's rho of x, y [n]. */
int tk_metric_spearman(double *out, const double *x, const double *y, size_t n, tk_err *err);
/* Average ranks (1-based, ties averaged) of x [n] into ranks [n]; scratch idx [n]. */
void tk_metric_ranks(double *ranks, size_t *idx, const double *x, size_t n);

#endif
