// Command recommend asks a recserve server for one user's top-k items: the Go twin of
// `recserve recommend`, and an example of the generated recserve.v1 stubs.
//
//	make go-client     # generates the stubs, builds build/go-bin/recommend
//	build/go-bin/recommend -target localhost:8500 -model retail -user 17850 -k 5 -recent 85123A,71053
//
// It prints "model <name> version <n>" and one line per item (rank, item id, score).
// On an error it prints one line, "recommend: error: <STATUS>: <message>", and exits 1
// (2 for bad usage).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	recservev1 "github.com/recserve/recserve/clients/go/gen/recserve/v1"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("recommend", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := fs.String("target", "localhost:8500", "server address (host:port)")
	model := fs.String("model", "", "model name in the server's repository (required)")
	user := fs.String("user", "", "user id (required)")
	k := fs.Int("k", 10, "number of items to return")
	recent := fs.String("recent", "", "comma-separated recent item ids, newest first")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of the call")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *model == "" || *user == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "recommend: error: -model and -user are required (and no positional arguments)")
		return 2
	}

	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(stderr, "recommend: error: %v\n", err)
		return 1
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	reply, err := recservev1.NewRecommendServiceClient(conn).Recommend(ctx, &recservev1.RecommendRequest{
		Model: *model, UserId: *user, K: int32(*k), RecentItemIds: splitList(*recent),
	})
	if err != nil {
		st := status.Convert(err)
		fmt.Fprintf(stderr, "recommend: error: %s: %s\n", codeName(st.Code().String()), oneLine(st.Message()))
		return 1
	}
	variant := ""
	if reply.GetVariant() != "" {
		variant = " variant " + reply.GetVariant()
	}
	fmt.Fprintf(stdout, "model %s version %d%s\n", reply.GetModel(), reply.GetVersion(), variant)
	scores := reply.GetScores()
	for i, item := range reply.GetItemIds() {
		fmt.Fprintf(stdout, "%3d  %-16s %7.4f\n", i+1, item, scores[i])
	}
	return 0
}

func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// codeName turns grpc-go's code names ("NotFound") into the canonical ones the server
// documents and the Python CLI prints ("NOT_FOUND").
func codeName(camel string) string {
	var b strings.Builder
	prev := rune(0)
	for _, r := range camel {
		if unicode.IsUpper(r) && unicode.IsLower(prev) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
		prev = r
	}
	return b.String()
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
