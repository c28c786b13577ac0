package main

import (
	"bytes"
	"context"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	recservev1 "github.com/recserve/recserve/clients/go/gen/recserve/v1"
)

// fakeServer answers "m" with k items named after the request, anything else NOT_FOUND.
type fakeServer struct {
	recservev1.UnimplementedRecommendServiceServer
	last *recservev1.RecommendRequest
}

func (s *fakeServer) Recommend(_ context.Context, r *recservev1.RecommendRequest) (*recservev1.RecommendResponse, error) {
	s.last = r
	if r.GetModel() != "m" {
		return nil, status.Errorf(codes.NotFound, "unknown model %q\n(second line)", r.GetModel())
	}
	reply := &recservev1.RecommendResponse{Model: "m", Version: 3}
	for i := int32(0); i < r.GetK(); i++ {
		reply.ItemIds = append(reply.ItemIds, "I"+string(rune('a'+i)))
		reply.Scores = append(reply.Scores, 1-float32(i)/10)
	}
	return reply, nil
}

func serve(t *testing.T) (string, *fakeServer) {
	t.Helper()
	lis, err := net.Listen("tcp", "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	fake := &fakeServer{}
	recservev1.RegisterRecommendServiceServer(srv, fake)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), fake
}

func TestPrintsItems(t *testing.T) {
	target, fake := serve(t)
	var out, errOut bytes.Buffer
	code := run([]string{"-target", target, "-model", "m", "-user", "17850", "-k", "3", "-recent", "A, B,,C"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
	want := "model m version 3\n  1  Ia                1.0000\n  2  Ib                0.9000\n  3  Ic                0.8000\n"
	if out.String() != want {
		t.Errorf("stdout %q, want %q", out.String(), want)
	}
	if got := strings.Join(fake.last.GetRecentItemIds(), ","); got != "A,B,C" || fake.last.GetUserId() != "17850" {
		t.Errorf("request %v", fake.last)
	}
}

func TestErrorIsOneLineWithStatus(t *testing.T) {
	target, _ := serve(t)
	var out, errOut bytes.Buffer
	code := run([]string{"-target", target, "-model", "nope", "-user", "1"}, &out, &errOut)
	if code != 1 || out.Len() != 0 {
		t.Fatalf("exit %d, stdout %q", code, out.String())
	}
	if want := "recommend: error: NOT_FOUND: unknown model \"nope\" (second line)\n"; errOut.String() != want {
		t.Errorf("stderr %q, want %q", errOut.String(), want)
	}
}

func TestUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"-model", "m"}, &out, &errOut); code != 2 {
		t.Errorf("missing -user: exit %d", code)
	}
	if code := run([]string{"-bogus"}, &out, &errOut); code != 2 {
		t.Errorf("unknown flag: exit %d", code)
	}
}

func TestCodeName(t *testing.T) {
	for in, want := range map[string]string{"OK": "OK", "NotFound": "NOT_FOUND", "DeadlineExceeded": "DEADLINE_EXCEEDED",
		"Unavailable": "UNAVAILABLE", "ResourceExhausted": "RESOURCE_EXHAUSTED"} {
		if got := codeName(in); got != want {
			t.Errorf("codeName(%q) = %q, want %q", in, got, want)
		}
	}
}
